"""Sampling: pure one-step samplers with log-probs (``steps``), typed trajectories and the rollout loop."""

from deepgen_rl.sampling.rollout import (
    RecomputedStep,
    decode_images,
    encode_conditioning,
    generate_images,
    guided_velocity,
    initial_noise,
    recompute_step,
    rollout,
)
from deepgen_rl.sampling.steps import (
    StepCoefficients,
    StepResult,
    effective_logprob_variant,
    gaussian_log_prob,
    sample_with_coefficients,
    step_coefficients,
    step_mean,
    transition_mean,
)
from deepgen_rl.sampling.trajectory import Conditioning, SamplerSettings, Trajectory

__all__ = [
    "Conditioning", "RecomputedStep", "SamplerSettings", "StepCoefficients", "StepResult", "Trajectory",
    "decode_images", "effective_logprob_variant", "encode_conditioning", "gaussian_log_prob", "generate_images",
    "guided_velocity", "initial_noise", "recompute_step", "rollout", "sample_with_coefficients", "step_coefficients",
    "step_mean", "transition_mean",
]

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
    cps_sde_step,
    dance_sde_step,
    flow_sde_step,
    gaussian_log_prob,
    ode_step,
    sampler_std_schedule,
    sampler_step,
    step_coefficients,
    step_mean,
    transition_log_prob,
    transition_mean,
)
from deepgen_rl.sampling.trajectory import Conditioning, SamplerSettings, Trajectory

__all__ = [
    "Conditioning", "RecomputedStep", "SamplerSettings", "StepCoefficients", "StepResult", "Trajectory",
    "cps_sde_step", "dance_sde_step", "decode_images", "encode_conditioning", "flow_sde_step", "gaussian_log_prob",
    "generate_images",
    "guided_velocity", "initial_noise", "ode_step", "recompute_step", "rollout", "sampler_std_schedule",
    "sampler_step", "step_coefficients", "step_mean", "transition_log_prob", "transition_mean",
]

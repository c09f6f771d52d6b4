"""Which denoising steps one rollout trains on (DESIGN.md section 4).

int(T * timestep_fraction) step indices drawn without replacement from 0..T-2 (the last step, which lands on
sigma = 0, is never trained: its s_t = 0 makes the log-prob and the KL degenerate), one draw shared by the batch.
"""

from __future__ import annotations

import torch

from deepgen_rl.sampling.rollout import check_sde_steps


def num_train_steps(num_inference_steps: int, timestep_fraction: float) -> int:
    """int(T * timestep_fraction), at least 1 and at most T - 1: the one rule (GRPOConfig.num_train_timesteps, the
    batch plan and the trainer's draw all use it), with its bounds T >= 2 and fraction in (0, 1]."""
    check_sde_steps(num_inference_steps)
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"--timestep_fraction must be in (0, 1]; got {timestep_fraction}.")
    return max(1, min(int(num_inference_steps * timestep_fraction), num_inference_steps - 1))


def sample_train_steps(num_inference_steps: int, timestep_fraction: float, generator: torch.Generator) -> list[int]:
    """Sorted step indices in 0..T-2 to train on, drawn from ``generator`` (seed it identically on every rank to
    train the same steps everywhere)."""
    count = num_train_steps(num_inference_steps, timestep_fraction)
    perm = torch.randperm(num_inference_steps - 1, generator=generator, device=generator.device)
    return sorted(int(i) for i in perm[:count].tolist())

"""Which denoising steps one rollout trains on (docs/algorithms.md#trained-timesteps).

int(T * timestep_fraction) step indices drawn without replacement from 0..T-2 (the last step, which lands on
sigma = 0, is never trained: its s_t = 0 makes the log-prob and the KL degenerate), one draw shared by the batch.
"""

from __future__ import annotations

import torch

# The counts and checks the flags validate with live below both config and sampling (core/sde_checks.py).
from deepgen_rl.core.sde_checks import num_train_steps, num_window_train_steps, sde_window_range


def sample_train_steps(num_inference_steps: int, timestep_fraction: float, generator: torch.Generator) -> list[int]:
    """Sorted step indices in 0..T-2 to train on, drawn from ``generator`` (seed it identically on every rank to
    train the same steps everywhere)."""
    count = num_train_steps(num_inference_steps, timestep_fraction)
    perm = torch.randperm(num_inference_steps - 1, generator=generator, device=generator.device)
    return sorted(int(i) for i in perm[:count].tolist())


# ----- the SDE window (MixGRPO arXiv 2507.21802, Flow-GRPO-Fast) ------------------------------------------------
# With --sde_window_size W > 0 the rollout samples with the SDE only on W consecutive steps start..start+W-1 (ODE
# elsewhere) and trains only on them. start is drawn per GRPO step, uniformly in [a, b - W] for
# --sde_window_range a,b (default 0,T), from a generator seeded by the step alone: every rank draws the same window.


def draw_window_start(low: int, high: int, window_size: int, generator: torch.Generator) -> int:
    """The window's first step, uniform in [low, high - W] (seed ``generator`` by the step only)."""
    return low + int(torch.randint(high - window_size - low + 1, (1,), generator=generator,
                                   device=generator.device))


def sample_window_train_steps(start: int, window_size: int, num_inference_steps: int, count: int,
                              generator: torch.Generator) -> list[int]:
    """Sorted ``count`` steps of the window start..start+W-1 (never T - 1), drawn from ``generator`` as
    ``sample_train_steps`` draws: with start 0 and W = T the very same steps."""
    eligible = min(start + window_size, num_inference_steps - 1) - start
    perm = torch.randperm(eligible, generator=generator, device=generator.device)
    return sorted(start + int(i) for i in perm[:count].tolist())

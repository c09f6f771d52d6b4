"""Which denoising steps one rollout trains on (docs/algorithms.md#trained-timesteps).

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


# ----- the SDE window (MixGRPO arXiv 2507.21802, Flow-GRPO-Fast) ------------------------------------------------
# With --sde_window_size W > 0 the rollout samples with the SDE only on W consecutive steps start..start+W-1 (ODE
# elsewhere) and trains only on them. start is drawn per GRPO step, uniformly in [a, b - W] for
# --sde_window_range a,b (default 0,T), from a generator seeded by the step alone: every rank draws the same window.


def sde_window_range(num_inference_steps: int, window_size: int, window_range: str | None) -> tuple[int, int]:
    """(a, b) of --sde_window_range "a,b" (None: 0,T), checked against --sde_window_size W and T: 0 <= a,
    a + W <= b <= T, and W >= 2 when b == T (a window holding the last step, never trained, keeps W - 1)."""
    if window_size < 1 or window_size > num_inference_steps:
        raise ValueError(f"--sde_window_size must be in 1..--num_inference_steps ({num_inference_steps}) when on "
                         f"(0 turns the window off); got {window_size}.")
    if window_range is None or not str(window_range).strip():
        low, high = 0, num_inference_steps
    else:
        try:
            low, high = (int(part) for part in str(window_range).split(","))
        except ValueError:
            raise ValueError(f"--sde_window_range must be two step indices 'a,b' (e.g. 0,25); got "
                             f"{window_range!r}.") from None
    if not 0 <= low < high <= num_inference_steps or high - low < window_size:
        raise ValueError(f"--sde_window_range {low},{high} must satisfy 0 <= a < b <= --num_inference_steps "
                         f"({num_inference_steps}) and b - a >= --sde_window_size ({window_size}).")
    if high == num_inference_steps and window_size < 2:
        raise ValueError(f"--sde_window_size 1 with --sde_window_range ending at T ({num_inference_steps}) may draw "
                         "only the last step, which is never trained: use a window of >= 2 or end the range before T.")
    return low, high


def num_window_train_steps(num_inference_steps: int, window_size: int, timestep_fraction: float,
                           range_end: int) -> int:
    """Steps trained per rollout with the window: max(1, int(W * timestep_fraction)), at most the window's trainable
    steps (W - 1 when the range reaches T, whose last step is never trained). W = T gives ``num_train_steps``."""
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"--timestep_fraction must be in (0, 1]; got {timestep_fraction}.")
    cap = window_size - 1 if range_end == num_inference_steps else window_size
    return max(1, min(int(window_size * timestep_fraction), cap))


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

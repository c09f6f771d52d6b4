"""Which steps a GRPO step samples with the SDE and trains on: the whole trajectory, or the SDE window.

Without --sde_window_size (the reference) every rollout step is stochastic and int(T x timestep_fraction) steps of
0..T-2 are trained. With it (MixGRPO arXiv 2507.21802, Flow-GRPO-Fast) one window start..start+W-1 per GRPO step
is SDE (ODE elsewhere) and only window steps are trained. Both draws use generators seeded by the step alone, so
every rank samples and trains the same steps; the window has its own seed stream, so W = T (start always 0) trains
exactly the steps of a run without a window.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepgen_rl.rl.timesteps import draw_window_start, sample_train_steps, sample_window_train_steps, sde_window_range

from ..core.distributed import SEED_SDE_WINDOW, SEED_TRAIN_STEPS, derive_seed, seeded_generator


def draw_sde_window(args, step: int) -> Optional[tuple[int, int]]:
    """(start, end) of GRPO step ``step``'s SDE window (end exclusive), or None without --sde_window_size."""
    size = args.sde_window_size
    if not size:
        return None
    low, high = sde_window_range(args.num_inference_steps, size, args.sde_window_range)
    generator = seeded_generator(torch.device("cpu"), derive_seed(args.seed, SEED_SDE_WINDOW, step))
    start = draw_window_start(low, high, size, generator)
    return start, start + size


def draw_train_steps(args, window: Optional[tuple[int, int]], step: int) -> list[int]:
    """The sorted step indices GRPO step ``step`` trains on (args.num_train_timesteps of them)."""
    generator = seeded_generator(torch.device("cpu"), derive_seed(args.seed, SEED_TRAIN_STEPS, step))
    if window is None:
        return sample_train_steps(args.num_inference_steps, args.timestep_fraction, generator)
    start, end = window
    return sample_window_train_steps(start, end - start, args.num_inference_steps, args.num_train_timesteps,
                                     generator)

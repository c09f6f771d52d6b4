"""Per-step statistics for the logs, computed on the WHOLE batch (all ranks gathered), plus phase timing.

Legend: N_all samples over all ranks, K rewards.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Optional, Sequence

import torch


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    if values.numel() == 0:
        return float("nan"), float("nan")
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return float(values.mean()), std


def weighted_reward(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, K] scores (NaN where unused/failed), [N, K] weights -> [N] sum_k w_k r_k over the used rewards."""
    used = weights > 0
    return torch.where(used, scores.nan_to_num(0.0) * weights, torch.zeros_like(scores)).sum(dim=1)


def reward_metrics(names: Sequence[str], scores: torch.Tensor, weights: torch.Tensor,
                   failed: torch.Tensor) -> dict[str, float]:
    """scores/weights [N_all, K], failed [N_all] -> reward/mean, reward/std (weighted sum over valid samples),
    reward/<name>/mean|std over the samples that computed it, reward/<name>/failed|num_samples (failed / used it),
    reward/failed_samples."""
    valid = ~failed
    metrics: dict[str, float] = {}
    metrics["reward/mean"], metrics["reward/std"] = _mean_std(weighted_reward(scores, weights)[valid])
    for k, name in enumerate(names):
        used = weights[:, k] > 0
        computed = used & torch.isfinite(scores[:, k])
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = _mean_std(scores[computed, k])
        metrics[f"reward/{name}/failed"] = float((used & ~torch.isfinite(scores[:, k])).sum())
        metrics[f"reward/{name}/num_samples"] = float(used.sum())
    metrics["reward/failed_samples"] = float(failed.sum())
    metrics["reward/num_samples"] = float(failed.numel())
    return metrics


def advantage_metrics(advantages: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """advantages/valid [N_all] -> mean, std, min, max over the valid samples."""
    used = advantages[valid]
    mean, std = _mean_std(used)
    return {"adv/mean": mean, "adv/std": std,
            "adv/min": float(used.min()) if used.numel() else float("nan"),
            "adv/max": float(used.max()) if used.numel() else float("nan")}


class PhaseTimer:
    """``with timer("rollout"): ...`` records wall seconds per phase (after syncing the accelerator)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.on_phase: Optional[Callable[[str], None]] = None  # told each phase entered (trainer/heartbeat.py)

    def mark(self, phase: str) -> None:
        """Say that ``phase`` starts (an untimed one, e.g. a checkpoint save) to ``on_phase``."""
        if self.on_phase is not None:
            self.on_phase(phase)

    @staticmethod
    def _sync() -> None:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        self.mark(phase)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def pop(self) -> dict[str, float]:
        out = {f"time/{phase}": value for phase, value in self.seconds.items()}
        self.seconds = {}
        return out

"""The divergence guard: a run whose weights blew up stops, names the cause and the last good checkpoint.

A run at a far too high learning rate once applied one huge update, then DeepSpeed skipped every later optimizer
step ("OVERFLOW! Skipping step"); the run still reached --max_steps, exited 0 and wrote checkpoints that
``latest`` would resume, while NaN images were scored as black ones. Now:

* a sample whose latent or image is not finite fails its rewards (``rewards/reward_step.py``), never scores;
* ``SkipBudget``: a GRPO step that applied no optimizer step although it tried (overflow, NaN loss) or whose
  images diverged counts; --max_skipped_steps consecutive ones stop the run (exit 4) with the cause. A step
  skipped only because every reward failed is the reward failure budget's (failure_budget.py): it neither counts
  nor resets the streak;
* ``check_trained_weights``: before a checkpoint is written, the trained parameters are checked for NaN/inf (one
  ``isfinite`` and norm pass over them on each rank, a 2-number all-reduce); non-finite weights are never saved.
  Every checkpoint records the verdict and the norm in its trainer_state.json, and ``latest`` skips one marked
  non-finite (checkpointing.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..core.distributed import all_reduce_sum

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The weights diverged (skipped steps past --max_skipped_steps, or NaN/inf weights at a save)."""


@dataclass
class SkipBudget:
    """Consecutive GRPO steps without an applied optimizer step (0 disables the limit)."""

    max_skipped_steps: int
    causes: list[tuple[int, str]] = field(default_factory=list)  # (step, why) of the current streak

    def update(self, step: int, metrics: Mapping[str, float]) -> Optional[str]:
        """Record step ``step``'s all-rank metrics; the reason to stop, or None to go on."""
        cause = skip_cause(metrics)
        if metrics.get("train/optimizer_steps", 0.0) > 0:
            self.causes = []
        elif cause is not None:
            self.causes.append((step, cause))
        if not self.max_skipped_steps or len(self.causes) < self.max_skipped_steps:
            return None
        return (f"{len(self.causes)} consecutive steps applied no optimizer step (--max_skipped_steps "
                f"{self.max_skipped_steps}): " + "; ".join(f"step {s}: {why}" for s, why in self.causes))

    @property
    def first_skipped_step(self) -> Optional[int]:
        """The first step of the current streak (None when the last counted step applied its update)."""
        return self.causes[0][0] if self.causes else None


def skip_cause(metrics: Mapping[str, float]) -> Optional[str]:
    """Why a GRPO step applied no optimizer step, when it is the weights' fault; None when it applied one or only
    the rewards failed."""
    if metrics.get("train/optimizer_steps", 0.0) > 0:
        return None
    nonfinite_images = int(metrics.get("reward/nonfinite_images", 0.0))
    nonfinite_losses = int(metrics.get("train/nonfinite_losses", 0.0))
    skipped = int(metrics.get("train/optimizer_steps_skipped", 0.0))
    if nonfinite_images:
        return f"{nonfinite_images} sample(s) with NaN/inf latents or images (the rollout diverged)"
    if nonfinite_losses:
        return f"NaN/inf loss in {nonfinite_losses} chunk(s), {skipped} optimizer step(s) skipped"
    if skipped:
        return (f"gradient overflow: NaN/inf gradients, DeepSpeed skipped all {skipped} optimizer step(s) "
                "('OVERFLOW! Skipping step')")
    return None


def stop_message(reason: str, output_dir: str | Path, first_skipped: Optional[int]) -> str:
    """The message of a run stopped for divergence: the cause, the last checkpoint before it, and what to do."""
    from .checkpointing import checkpoint_step, list_checkpoints

    before = [p for p in list_checkpoints(output_dir)
              if first_skipped is None or checkpoint_step(p) < first_skipped]
    if before:
        where = (f"the last checkpoint saved before it is {before[-1]} (its weights are those the failing steps "
                 f"started from; if they are already broken, pick an older one)")
    else:
        where = "no checkpoint was saved before it"
    return (f"training diverged: {reason}. No checkpoint is written from here; {where}. Lower --learning_rate "
            "(or check --max_grad_norm and the data), then resume from that checkpoint (--resume_from_checkpoint "
            "<folder>).")


@dataclass(frozen=True)
class WeightCheck:
    finite: bool
    norm: float  # L2 norm of the trained parameters (NaN when not finite)
    bad: tuple[str, ...]  # names of this rank's parameters holding NaN/inf (first few)


def check_trained_weights(model: torch.nn.Module, device) -> WeightCheck:
    """Collective: are the trained parameters (``requires_grad``) finite on every rank, and their L2 norm.

    One fp64-accumulated norm per parameter (no copy of the weights): it is finite exactly when every value is, as
    squares of bf16/fp32 values cannot overflow fp64. Under ZeRO-3 each rank holds a partition (``ds_tensor``) and
    the squared norms add up over ranks; otherwise every rank holds the whole parameter."""
    names, norms, partitioned = [], [], False
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = getattr(param, "ds_tensor", None)
        partitioned = partitioned or tensor is not None
        names.append(name)
        norms.append(torch.linalg.vector_norm((param if tensor is None else tensor).detach(), dtype=torch.float64))
    norms_cpu = torch.stack(norms).cpu() if norms else torch.zeros(0, dtype=torch.float64)  # one device sync
    bad = [name for name, norm in zip(names, norms_cpu.tolist()) if not math.isfinite(norm)]
    squares = float(norms_cpu.pow(2).sum())
    totals = all_reduce_sum(torch.tensor([float(len(bad)), squares if partitioned else 0.0], dtype=torch.float64),
                            device)
    finite = float(totals[0]) == 0
    norm = (float(totals[1]) if partitioned else squares) ** 0.5
    return WeightCheck(finite=finite, norm=norm if finite else float("nan"), bad=tuple(bad[:5]))

"""One GRPO step's update: the chunks' backward passes, THE optimizer step, and the step's training metrics.

A ``StepUpdate`` lives for one GRPO step (docs/algorithms.md#one-grpo-step, "train"). The trainer builds it with what
the
update reads (engine, plan, EMA, the rollout and its advantages) and two callbacks: the chunk objective (the
trainer's, so GRPO, GRPO-Guard and DiffusionNFT share this loop) and the SIGTERM safe point. Optimizer steps are
placed as --optimizer_step_schedule says (batching.py); each is recorded as an ``OptimizerStepRecord``.

Legend: N samples of the rank, S samples per actor update, n samples in a chunk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..core.distributed import all_reduce_sum
from .batching import BatchPlan
from .global_draws import actor_update_generators
from .kl_forward import KLGradientStash
from .sde_window import draw_train_steps
from .update_plan import ChunkStats, OptimizerStepRecord, Part, actor_update_parts, part_chunks

logger = logging.getLogger(__name__)

# train_phase's metrics when no sample of any rank has a reward (no update at all).
SKIPPED_UPDATE = {"train/skipped": 1.0, "train/step_applied": 0.0, "train/optimizer_steps": 0.0,
                  "train/optimizer_steps_skipped": 0.0}
# The share of --clip_range above which the first chunk's ratio deviation is warned about.
FIRST_CHUNK_WARN_SHARE = 0.1


def first_chunk_warning(deviation: float, clip_range: float) -> Optional[str]:
    """Why the step's first chunk is suspicious, or None. Its weights are those that recorded the log-probs and it
    recomputes with the rollout's forward size (SamplerSettings.forward_rows), so max |ratio - 1| is fp32 rounding;
    above FIRST_CHUNK_WARN_SHARE x --clip_range the clip would act on numerical noise, not on the policy's change
    (e.g. kernels that depend on more than a forward's row count)."""
    if not deviation > FIRST_CHUNK_WARN_SHARE * clip_range:  # NaN (no chunk) never warns
        return None
    return (f"the first training chunk's ratio deviates from 1 by {deviation:.3g} ({deviation / clip_range:.0%} of "
            f"--clip_range {clip_range:g}) before any update: the recorded log-probs do not match the training "
            "forward, so the clip acts on numerical noise (docs/memory.md#bf16-and-the-first-chunks-ratio); a run "
            "with --model_dtype float32 shows whether bf16 kernels cause it.")


def draw_update(args, plan: BatchPlan, sde_window: Optional[tuple[int, int]], step: int, rank: int,
                num_samples: int) -> tuple[list[int], list[Part]]:
    """GRPO step ``step``'s drawn timesteps (one draw shared by every rank: seeded by the step only; inside the SDE
    window when on) and this rank's actor-update parts of its N samples (keyed by global sample index:
    global_draws.py)."""
    steps = draw_train_steps(args, sde_window, step)
    blocks = ([] if plan.actor_update_steps == 1 else
              actor_update_generators(args.seed, step, rank, num_samples, plan.actor_update_steps))
    parts = actor_update_parts(num_samples, plan.actor_update_steps, blocks)
    assert len(steps) == plan.num_train_timesteps, "batch plan and drawn steps disagree"
    return steps, parts


@dataclass
class StepUpdate:
    """The state one GRPO step's update shares (advantages [N] and valid [N] on the device) and its machinery."""

    engine: Any  # the DeepSpeed engine
    model: torch.nn.Module
    plan: BatchPlan
    ema: Optional[Any]  # EMA, stepped after every applied optimizer step
    device: torch.device
    objective: Callable[["StepUpdate", int, Part], Any]  # (ctx, step_index, rows) -> ChunkObjective
    safe_point: Callable[[str], None]
    batch: Any  # RolloutBatch
    adv: torch.Tensor
    valid: torch.Tensor
    policy_share: float  # 1 - sftaux_coef with SFT-aux, else 1
    global_step: int  # for the log line of a non-finite loss
    world_size: int = 1  # ranks whose gradients DeepSpeed averages (the loss denominators' scale)
    reference_conditioning: Optional[Any] = None
    nft_draw: Optional[object] = None  # --atrain_algorithm diffusionnft: the step's per-sample timesteps (nft.py)
    first_deviation: float = float("nan")  # max |ratio - 1| of the step's first chunk (exactly 0 up to fp32 noise)
    max_deviation: float = 0.0
    rollout_chunks: list = field(default_factory=list)  # per_rollout: the chunks seen before its one step
    records: list[OptimizerStepRecord] = field(default_factory=list)  # the step's optimizer steps
    stats: ChunkStats = field(default_factory=ChunkStats)
    steps_taken: int = 0
    steps_applied: int = 0
    last_grad_norm: Optional[float] = None
    step_lr: float = float("nan")
    kl_forward: str = "separate"  # --kl_forward as run: where reference's beta*KL step gets its gradient

    def schedule(self, parts: list[Part], steps: list[int], valid_cpu: torch.Tensor,
                 sftaux: bool) -> Iterator[tuple[int, list[Part], float, bool]]:
        """(step_index, chunks, denominator, last_backward) per (actor-update part, drawn timestep), in order.
        per_rollout: the masked mean over (drawn steps x valid samples of every part); else per (part, timestep).
        ``last_backward``: per_rollout's final policy backward when no SFT-aux batch follows it.
        The valid counts are those of ALL ranks (a collective) divided by the world size W: DeepSpeed averages
        the ranks' gradients, so sum_r (rank r's valid losses) / (W x denominator) is the mean over every valid
        sample of the step, however the failed samples are spread over the ranks (world-size invariant)."""
        plan = self.plan
        per_rollout = plan.optimizer_step_schedule == "per_rollout"
        local = torch.tensor([float(valid_cpu[p].sum()) for p in parts], dtype=torch.float64)
        counts = [max(float(c), 1.0) / self.world_size for c in all_reduce_sum(local, self.device).tolist()]
        rollout_denominator = sum(counts) * len(steps)
        for k, part in enumerate(parts):
            chunks = part_chunks(part, self.batch.trajectory.num_samples, plan.train_micro_batch_size)
            denominator = rollout_denominator if per_rollout else counts[k]
            for i, step_index in enumerate(steps):
                rollout_ends = per_rollout and not sftaux and (k, i) == (len(parts) - 1, len(steps) - 1)
                yield step_index, chunks, denominator, rollout_ends

    def train_timestep(self, step_index: int, chunks: list[Part], denominator: float, *, last_backward: bool) -> None:
        """One drawn timestep of one actor update: its chunks' backward passes and, unless per_rollout, its
        optimizer step(s). ``last_backward``: per_rollout's final backward (the rollout's one boundary)."""
        schedule = self.plan.optimizer_step_schedule
        split_kl = schedule == "reference" and self.plan.kl_step
        # --kl_forward shared: the KL step's gradient comes from these forwards, before the policy step moves them.
        stash = KLGradientStash(self.trained_params()) if split_kl and self.kl_forward == "shared" else None
        seen = []
        for j, rows in enumerate(chunks):
            if not self.steps_taken:  # nothing of this GRPO step applied yet: a stop here loses nothing
                self.safe_point("training chunk")
            out = self.chunk(step_index, rows)
            seen.append(out)
            # Each chunk's share of the masked mean over the step's valid samples; the convex SFT-aux mix
            # L = (1 - lambda) L_grpo + lambda L_sft is applied as per-backward weights.
            weight = self.policy_share * out.num_valid / denominator
            if stash is not None:
                stash.add(out.kl_term * weight)
                self.stats.nonfinite_losses += 0.0 if math.isfinite(float(out.kl_term.detach())) else 1.0
            term = out.policy_term if split_kl else out.loss
            boundary = j == len(chunks) - 1 and (last_backward or schedule != "per_rollout")
            self.backward(term * weight, boundary=boundary)
            self.stats.add(out, math.isfinite(float(term.detach())))
        if schedule == "per_rollout":
            if last_backward:
                self.record_step("rollout", self.rollout_chunks + seen)
            else:
                self.rollout_chunks.extend(seen)
            return
        self.record_step("policy" if split_kl else "policy+kl", seen)
        if stash is not None:  # the reference's beta*KL step, its gradient taken where the policy step started
            self.backward(stash.loss(), boundary=True)
            self.record_step("kl", [])  # no forward of its own: no ratio statistics
        elif split_kl:  # --kl_forward separate: a fresh forward per chunk under the weights the policy step left
            self._kl_backward(step_index, chunks, denominator)

    def trained_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _kl_backward(self, step_index: int, chunks: list[Part], denominator: float) -> None:
        kl_seen = []
        for j, rows in enumerate(chunks):
            out = self.chunk(step_index, rows)
            kl_seen.append(out)
            self.backward(out.kl_term * (self.policy_share * out.num_valid / denominator),
                          boundary=j == len(chunks) - 1)
            self.stats.nonfinite_losses += 0.0 if math.isfinite(float(out.kl_term.detach())) else 1.0
        self.record_step("kl", kl_seen)

    def chunk(self, step_index: int, rows: Part):
        """The objective of one chunk under the current weights; tracks the ratio's deviation from 1."""
        out = self.objective(self, step_index, rows)
        if math.isnan(self.first_deviation):
            self.first_deviation = out.ratio_max_dev
        self.max_deviation = max(self.max_deviation, out.ratio_max_dev)
        return out

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """One backward pass; ``boundary``: it ends an optimizer step's accumulation (then the step is taken)."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        if boundary:
            self.optimizer_step()
        else:
            self.engine.step()  # DeepSpeed's micro-step bookkeeping only: not a boundary, so no update

    def optimizer_step(self) -> bool:
        """THE place where an optimizer step happens: DeepSpeed clips, steps AdamW and advances the LR schedule at
        the boundary the last backward set (a non-finite gradient skips the update and holds the schedule).
        Returns whether the update was applied."""
        self.step_lr = float(self.engine.get_lr()[0])
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        self.steps_taken += 1
        self.steps_applied += int(applied)
        if applied:
            self.last_grad_norm = self.engine.get_global_grad_norm()
            if self.ema is not None:  # the EMA follows every APPLIED optimizer step (its warm-up counts them)
                self.ema.step(self.model)
        return applied

    def record_step(self, kind: str, chunks: list) -> None:
        nan = float("nan")
        ratio = [c.ratio_mean for c in chunks]
        self.records.append(OptimizerStepRecord(
            kind=kind, lr=self.step_lr, applied=bool(self.engine.was_step_applied()),
            ratio_mean=sum(ratio) / len(ratio) if ratio else nan,
            ratio_max_dev=max((c.ratio_max_dev for c in chunks), default=nan),
            clip_fraction=sum(c.clip_fraction for c in chunks) / len(chunks) if chunks else nan))

    def sftaux_backward(self, loss: torch.Tensor, coef: float) -> float:
        """The SFT-aux batch's backward (``loss``: the rank's share L_r, core/sftaux_batch.py), weighted by
        --sftaux_coef: the last backward of any schedule's rollout."""
        self.backward(loss * coef, boundary=True)
        self.record_step("rollout" if self.plan.optimizer_step_schedule == "per_rollout" else "sft", [])
        value = float(loss.detach())
        self.stats.nonfinite_losses += 0.0 if math.isfinite(value) else 1.0
        return value

    def policy_metrics(self, lr: float) -> dict[str, float]:
        """The step's learning rate (read before its first optimizer step) and ratio deviations."""
        plan = self.plan
        return {"train/lr": lr, "policy/first_chunk_ratio_max_dev": self.first_deviation,
                "policy/ratio_max_dev": self.max_deviation,
                "train/actor_dropped_samples": float(self.batch.trajectory.num_samples
                                                     - plan.actor_update_steps * plan.samples_per_update)}

    def finish(self, beta: float) -> dict[str, float]:
        """Average the chunk statistics over ranks (a collective); report how many optimizer steps DeepSpeed
        applied."""
        taken, applied_steps = self.steps_taken, self.steps_applied
        if taken != self.plan.optimizer_steps_per_rollout:
            raise RuntimeError(f"the rollout took {taken} optimizer steps, not the "
                               f"{self.plan.optimizer_steps_per_rollout} of --optimizer_step_schedule "
                               f"{self.plan.optimizer_step_schedule}: a step was misplaced.")
        total = ChunkStats.from_tensor(all_reduce_sum(self.stats.to_tensor(), self.device))
        chunks = max(total.chunks, 1.0)
        applied = applied_steps == taken
        nonfinite = total.nonfinite_losses
        if nonfinite and applied:
            logger.error("a non-finite loss did not stop the optimizer step: check the DeepSpeed config's overflow "
                         "checks (bf16.check_grad_overflow).")
        elif nonfinite:
            logger.warning("step %d: non-finite loss in %d chunk(s): %d of %d optimizer step(s) skipped.",
                           self.global_step, int(nonfinite), taken - applied_steps, taken)
        metrics = {"loss/policy": total.policy_loss / chunks, "loss/kl": total.kl / chunks,
                   "policy/clip_fraction": total.clip_fraction / chunks, "policy/ratio_mean": total.ratio_mean / chunks,
                   "train/nonfinite_losses": nonfinite, "train/skipped": 0.0 if applied_steps else 1.0,
                   "train/step_applied": 1.0 if applied else 0.0, "train/optimizer_steps": float(applied_steps),
                   "train/optimizer_steps_skipped": float(taken - applied_steps)}
        metrics["loss/total"] = metrics["loss/policy"] + beta * metrics["loss/kl"]
        if applied_steps and self.last_grad_norm is not None:
            metrics["train/grad_norm"] = float(self.last_grad_norm)
        if self.ema is not None:
            metrics.update(self.ema.metrics())
        return metrics

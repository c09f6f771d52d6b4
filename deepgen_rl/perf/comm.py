"""Bytes each rank sends per GRPO step, by collective: a ring-algorithm volume model of DeepSpeed ZeRO-2 / ZeRO-3
and of the trainer's own collectives. Pure arithmetic.

Ring volumes (W ranks, f = (W - 1) / W): a reduce-scatter or an all-gather of a tensor of S bytes sends f x S
from each rank; an all-reduce (reduce-scatter + all-gather) 2 f x S; an all-gather of s bytes from every rank
(the trainer's all_gather_cat) (W - 1) x s. Weights and gradients travel in the model dtype (bf16: 2 bytes).

* ZeRO-2 (DeepSpeed stage 2 reduces on EVERY backward pass, not only at the accumulation boundary: its engine's
  ``allreduce_gradients``): per backward pass a gradient reduce-scatter of the trained parameters; per optimizer
  step an all-gather of the updated parameters (each rank stepped its own partition). Stage 1 reduces only at the
  boundary (per optimizer step, then the same all-gather), stage 0 all-reduces per optimizer step.
* ZeRO-3: every DiT / LLM / VAE forward call gathers its parameters (the engine partitions frozen modules too);
  each backward pass gathers the DiT again (the checkpointed recompute uses that gather) and reduce-scatters the
  gradients; no all-gather after the optimizer step. The reference / NFT copies are the trainer's own whole
  tensors (never gathered). Parameter caching across calls (stage3_max_reuse_distance, persistence of small
  parameters) is ignored: an upper bound.
* Trainer collectives (trainer/advantage_step.py, updater.py, grpo_trainer.py): rewards / weights [N, K] and
  failed / valid / advantages [N] gathered from every rank, a handful of float64 all-reduces (K = 4 rewards assumed):
  kilobytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ASSUMED_REWARDS = 4  # K: reward columns gathered per sample (a few KB either way)


@dataclass(frozen=True)
class CommCounts:
    """What one rank's GRPO step runs that communicates (all per rank)."""

    backward_passes: int  # each reduces gradients (ZeRO-2 and -3)
    optimizer_steps: int  # ZeRO-2 all-gathers the updated parameters after each
    dit_forward_calls: int  # ZeRO-3 gathers: rollout + training forwards (each forward_rows-sized piece)
    dit_backward_calls: int  # ZeRO-3 gathers in backward
    text_calls: int  # LLM + connector forwards (rollout encoding, per-chunk re-encoding, SFT-aux captions)
    vae_calls: int  # decodes + SFT-aux encode
    samples: int  # N (trainer collectives)


@dataclass(frozen=True)
class ParamBytes:
    """Bytes of parameters (in the weight dtype) that travel: trained, and per partitioned module (ZeRO-3)."""

    trained: int
    dit: int
    text: int  # LLM + connector + projectors + meta queries
    vae: int


def ring_share(world_size: int) -> float:
    """f = (W - 1) / W: the share of a reduce-scattered / all-gathered tensor each rank sends."""
    return (world_size - 1) / world_size


def bytes_per_rank(counts: CommCounts, params: ParamBytes, world_size: int, zero_stage: int) -> dict[str, float]:
    """Bytes one rank sends per GRPO step, by collective (zero when a single rank)."""
    f = ring_share(world_size)
    if zero_stage <= 1:  # stage 1 / 0 reduce only at the accumulation boundary: once per optimizer step
        out = ({"gradient reduce-scatter": counts.optimizer_steps * f * params.trained,
                "updated-parameter all-gather": counts.optimizer_steps * f * params.trained} if zero_stage == 1
               else {"gradient all-reduce": counts.optimizer_steps * 2 * f * params.trained})
    else:
        out = {"gradient reduce-scatter": counts.backward_passes * f * params.trained}
    if zero_stage >= 3:
        out["ZeRO-3 parameter all-gathers (forward)"] = f * (counts.dit_forward_calls * params.dit
                                                             + counts.text_calls * params.text
                                                             + counts.vae_calls * params.vae)
        out["ZeRO-3 parameter all-gathers (backward)"] = f * counts.dit_backward_calls * params.dit
    elif zero_stage == 2:
        out["updated-parameter all-gather"] = counts.optimizer_steps * f * params.trained
    gathered = counts.samples * (2 * ASSUMED_REWARDS * 4 + 1 + 1 + 4)  # scores, weights fp32; failed, valid; adv
    out["advantage / metric collectives"] = (world_size - 1) * gathered + 2 * f * 16 * 8  # + ~16 float64 reduces
    return out


def comm_counts(counts, plan, *, rollout_micro_batch_size: int, decode_micro_batch_size: int,
                forward_rows: int) -> CommCounts:
    """The CommCounts of one rank's step from its StepCounts (step_flops.py) and BatchPlan."""
    def calls(rows: int, per_call: int) -> int:
        return math.ceil(rows / per_call) if rows else 0

    n = counts.samples
    micro = [min(rollout_micro_batch_size, n - start) for start in range(0, n, rollout_micro_batch_size)]
    rollout_calls = counts.inference_steps * sum(calls(m, forward_rows) for m in micro)
    chunk_calls = (plan.actor_update_steps * plan.num_train_timesteps
                   * sum(calls(min(plan.train_micro_batch_size, plan.samples_per_update - start), forward_rows)
                         for start in range(0, plan.samples_per_update, plan.train_micro_batch_size)))
    separate = counts.kl_forward == "separate"
    kl_step = counts.kl_forward != "none"
    sft = 1 if counts.sftaux_rows else 0
    return CommCounts(
        backward_passes=plan.policy_micro_steps * (2 if kl_step else 1) + sft,
        optimizer_steps=plan.optimizer_steps_per_rollout,
        dit_forward_calls=rollout_calls + chunk_calls * (2 if separate else 1) + sft,
        dit_backward_calls=chunk_calls * (2 if kl_step else 1) + sft,
        text_calls=1 + (counts.train_chunks * (2 if separate else 1) if counts.text_trains else 0) + sft,
        vae_calls=calls(n, decode_micro_batch_size) + sft,
        samples=n)

"""How one GRPO step's batch is split over ranks, actor updates, training chunks and optimizer steps.

Every rank rolls out ``prompts_per_rank`` prompts x ``rollout_n`` images, splits them into U actor-update parts
of S = N // U samples, and trains each part on ``num_train_timesteps`` drawn steps in chunks of
``atrain_micro_batch_size`` samples. ``--optimizer_step_schedule`` says which backward passes one optimizer step
accumulates (docs/algorithms.md#optimizer-steps-per-rollout):

    reference     per (part, timestep): the policy backward of its M chunks -> step; the beta*KL backward of the
                  M chunks -> step (beta > 0); then the SFT-aux backward -> step.  U*T'*(1 + [beta>0]) + [sft]
    per_timestep  per (part, timestep): policy + beta*KL of its M chunks -> step; SFT-aux -> step.  U*T' + [sft]
    per_rollout   everything -> ONE step.                                                              1

DeepSpeed's ``gradient_accumulation_steps`` is the largest number of backward passes one step accumulates (the
trainer marks each step's last backward as the boundary), derived from the world size instead of being a flag,
so any NNODES x NGPUS works as long as the global batch splits into whole prompts per rank.

Legend: B prompts per rank, G = rollout_n, N = B * G samples per rank, U actor updates, S = N // U samples per
update, M = ceil(S / micro) chunks, T' trained timesteps, W world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """The per-rank shape of one GRPO step (all counts per rank unless named global)."""

    world_size: int
    global_batch_size: int  # images per rollout (GRPO step) over all ranks
    rollout_n: int  # G
    prompts_per_rank: int  # B
    samples_per_rank: int  # N = B * G
    train_micro_batch_size: int  # samples per training forward/backward (<= S)
    chunks_per_timestep: int  # M = ceil(S / train_micro_batch_size), per actor update
    num_train_timesteps: int  # drawn steps trained per rollout
    sftaux_micro_steps: int  # 1 when the SFT-aux loss is on, else 0
    optimizer_step_schedule: str  # reference | per_timestep | per_rollout
    actor_update_steps: int  # U
    kl_step: bool  # beta > 0: the reference schedule steps once more on the beta*KL backward

    @property
    def samples_per_update(self) -> int:
        """S = N // U: each actor update's part (the remainder N - U*S is not trained)."""
        return self.samples_per_rank // self.actor_update_steps

    @property
    def policy_micro_steps(self) -> int:
        """Forward/backward passes of the policy loss per rollout (all actor updates)."""
        return self.actor_update_steps * self.num_train_timesteps * self.chunks_per_timestep

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimizer (and LR-scheduler) steps one GRPO step takes under the schedule."""
        if self.optimizer_step_schedule == "per_rollout":
            return 1
        per_timestep = 2 if self.optimizer_step_schedule == "reference" and self.kl_step else 1
        return self.actor_update_steps * self.num_train_timesteps * per_timestep + self.sftaux_micro_steps

    @property
    def gradient_accumulation_steps(self) -> int:
        """The most backward passes one optimizer step accumulates (DeepSpeed's GAS)."""
        if self.optimizer_step_schedule == "per_rollout":
            return self.policy_micro_steps + self.sftaux_micro_steps
        return self.chunks_per_timestep

    @property
    def deepspeed_train_batch_size(self) -> int:
        """DeepSpeed's bookkeeping identity train_batch_size = micro x GAS x world size."""
        return self.train_micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def forward_rows(self, rollout_micro_batch_size: int) -> int:
        """Rows per DiT forward, the same in the rollout and in training: min(training chunk, rollout micro-batch).

        In bf16 a forward's result depends on its row count, so a log-prob recorded in a forward of another size
        than the training chunk's moves the first chunk's ratio off 1 by far more than fp32 rounding (docs/memory.md#bf16-and-the-first-chunks-ratio). A smaller chunk therefore splits the rollout's forwards to its size,
        and a larger one runs its forward in pieces of the rollout's size; the FLOPs are the same, the kernels
        smaller."""
        return min(self.train_micro_batch_size, rollout_micro_batch_size)

    @property
    def prompts_per_step(self) -> int:
        """Prompts consumed by one optimizer step over all ranks (B x W)."""
        return self.prompts_per_rank * self.world_size


def nearest_valid_global_batch_sizes(global_batch_size: int, rollout_n: int, world_size: int) -> list[int]:
    """The multiples of rollout_n x world_size just below (if positive) and above ``global_batch_size``."""
    unit = rollout_n * world_size
    below = (global_batch_size // unit) * unit
    return [value for value in (below, below + unit) if value > 0]


def plan_batches(*, global_batch_size: int, rollout_n: int, world_size: int, atrain_micro_batch_size: int,
                 num_train_timesteps: int, sftaux_enabled: bool, optimizer_step_schedule: str,
                 actor_update_steps: int, kl_step: bool) -> BatchPlan:
    """Derive the per-rank batch and the gradient accumulation from the flags and the world size.

    Raises ValueError naming --global_batch_size, --rollout_n and the world size (with the nearest valid
    --global_batch_size values) when the global batch does not split into a positive whole number of prompts
    per rank.
    """
    for flag, value in (("global_batch_size", global_batch_size), ("rollout_n", rollout_n),
                        ("atrain_micro_batch_size", atrain_micro_batch_size),
                        ("num_train_timesteps", num_train_timesteps), ("world size", world_size),
                        ("atrain_num_actor_update_steps", actor_update_steps)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive; got {value}.")
    prompts_total, rem_group = divmod(global_batch_size, rollout_n)
    prompts_per_rank, rem_rank = divmod(prompts_total, world_size)
    if rem_group or rem_rank or prompts_per_rank == 0:
        suggestions = nearest_valid_global_batch_sizes(global_batch_size, rollout_n, world_size)
        raise ValueError(
            f"--global_batch_size {global_batch_size} cannot be split into whole prompt groups on every rank: it must "
            f"be a positive multiple of --rollout_n ({rollout_n}) x world size ({world_size}) = "
            f"{rollout_n * world_size} (images per step = prompts per rank x rollout_n x world size). Nearest valid "
            f"--global_batch_size: {' or '.join(map(str, suggestions))} (or change --rollout_n or the number of "
            f"processes)."
        )
    samples = prompts_per_rank * rollout_n
    if actor_update_steps > samples:
        raise ValueError(f"--atrain_num_actor_update_steps {actor_update_steps} exceeds the {samples} samples each "
                         "rank rolls out (--global_batch_size / world size): every actor update needs at least one "
                         "sample.")
    micro = min(atrain_micro_batch_size, samples // actor_update_steps)
    return BatchPlan(
        world_size=world_size,
        global_batch_size=global_batch_size,
        rollout_n=rollout_n,
        prompts_per_rank=prompts_per_rank,
        samples_per_rank=samples,
        train_micro_batch_size=micro,
        chunks_per_timestep=math.ceil((samples // actor_update_steps) / micro),
        num_train_timesteps=num_train_timesteps,
        sftaux_micro_steps=1 if sftaux_enabled else 0,
        optimizer_step_schedule=optimizer_step_schedule,
        actor_update_steps=actor_update_steps,
        kl_step=kl_step,
    )


def total_training_steps(*, max_steps: int, num_train_epochs: float, num_prompts: int, prompts_per_step: int) -> int:
    """GRPO steps (rollouts) of the run: --max_steps when > 0, else epochs x ceil(prompts / prompts per step).

    An "epoch" is as many prompts as the training datasets hold (prompts are drawn with replacement).
    """
    if max_steps > 0:
        return max_steps
    if num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be > 0 when --max_steps is not set; got {num_train_epochs}.")
    if num_prompts <= 0:
        raise ValueError("the training datasets hold no prompts: check --dataset_config.")
    return max(1, math.ceil(num_train_epochs * math.ceil(num_prompts / prompts_per_step)))

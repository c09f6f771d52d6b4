"""How one GRPO step's batch is split over ranks, rollout micro-batches and training chunks.

One optimizer step per rollout (the reference's choice, DESIGN.md section 4): every rank rolls out
``prompts_per_rank`` prompts x ``rollout_n`` images, then trains on ``num_train_timesteps`` drawn steps in
chunks of ``atrain_micro_batch_size`` samples; the gradients of all those chunks (plus the SFT-aux batch when
enabled) accumulate into ONE optimizer step. DeepSpeed's ``gradient_accumulation_steps`` is exactly that count,
so it is derived from the world size instead of being a flag, and any NNODES x NGPUS works as long as the
global batch splits into whole prompts per rank.

Legend: B prompts per rank, G = rollout_n, N = B * G samples per rank, W world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """The per-rank shape of one GRPO step (all counts per rank unless named global)."""

    world_size: int
    global_batch_size: int  # images per optimizer step over all ranks
    rollout_n: int  # G
    prompts_per_rank: int  # B
    samples_per_rank: int  # N = B * G
    train_micro_batch_size: int  # samples per training forward/backward (<= N)
    chunks_per_timestep: int  # ceil(N / train_micro_batch_size)
    num_train_timesteps: int  # drawn steps trained per rollout
    sftaux_micro_steps: int  # 1 when the SFT-aux loss is on, else 0

    @property
    def policy_micro_steps(self) -> int:
        """Forward/backward passes of the policy loss per optimizer step."""
        return self.num_train_timesteps * self.chunks_per_timestep

    @property
    def gradient_accumulation_steps(self) -> int:
        """Backward passes accumulated into the single optimizer step of a rollout (DeepSpeed's GAS)."""
        return self.policy_micro_steps + self.sftaux_micro_steps

    @property
    def deepspeed_train_batch_size(self) -> int:
        """DeepSpeed's bookkeeping identity train_batch_size = micro x GAS x world size."""
        return self.train_micro_batch_size * self.gradient_accumulation_steps * self.world_size

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
                 num_train_timesteps: int, sftaux_enabled: bool) -> BatchPlan:
    """Derive the per-rank batch and the gradient accumulation from the flags and the world size.

    Raises ValueError naming --global_batch_size, --rollout_n and the world size (with the nearest valid
    --global_batch_size values) when the global batch does not split into a positive whole number of prompts
    per rank.
    """
    for flag, value in (("global_batch_size", global_batch_size), ("rollout_n", rollout_n),
                        ("atrain_micro_batch_size", atrain_micro_batch_size),
                        ("num_train_timesteps", num_train_timesteps), ("world size", world_size)):
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
    micro = min(atrain_micro_batch_size, samples)
    return BatchPlan(
        world_size=world_size,
        global_batch_size=global_batch_size,
        rollout_n=rollout_n,
        prompts_per_rank=prompts_per_rank,
        samples_per_rank=samples,
        train_micro_batch_size=micro,
        chunks_per_timestep=math.ceil(samples / micro),
        num_train_timesteps=num_train_timesteps,
        sftaux_micro_steps=1 if sftaux_enabled else 0,
    )


def total_training_steps(*, max_steps: int, num_train_epochs: float, num_prompts: int, prompts_per_step: int) -> int:
    """Optimizer steps of the run: --max_steps when > 0, else epochs x ceil(prompts / prompts per step).

    An "epoch" is as many prompts as the training datasets hold (prompts are drawn with replacement).
    """
    if max_steps > 0:
        return max_steps
    if num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be > 0 when --max_steps is not set; got {num_train_epochs}.")
    if num_prompts <= 0:
        raise ValueError("the training datasets hold no prompts: check --dataset_config.")
    return max(1, math.ceil(num_train_epochs * math.ceil(num_prompts / prompts_per_step)))

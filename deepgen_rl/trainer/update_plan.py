"""The training side of one GRPO step: actor-update parts, their chunks, and named per-step statistics.

Legend: N samples of the rank, U actor updates, S = N // U samples per update, n samples in a chunk.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Sequence, Union

import torch

from deepgen_rl.sampling.trajectory import split_rows

Part = Union[slice, torch.Tensor]  # all rows in order (U == 1), or an index tensor [S]


def actor_update_parts(num_samples: int, num_updates: int, block_generators: Sequence[torch.Generator]) -> list[Part]:
    """U disjoint parts of S = N // U rows (PPO mini-batches, as the reference's --atrain_num_actor_update_steps):
    the rows are cut into S blocks of U consecutive rows and block j's rows are dealt at random, one to each part
    (``block_generators[j]`` draws its permutation; the trainer keys it by the block's GLOBAL first sample, so the
    parts do not depend on the number of ranks: trainer/global_draws.py). The last N - U*S rows are not trained.
    A part holds one row of every block, so it samples every prompt's group about evenly. Each part's rows are in
    ascending order. U == 1 keeps all rows in their order (nothing to split, and the chunks stay the contiguous
    ones of a per-rollout run)."""
    if num_updates == 1:
        return [slice(None)]
    size = num_samples // num_updates
    if len(block_generators) != size:
        raise ValueError(f"{len(block_generators)} block generators for {size} blocks of {num_updates} samples.")
    deals = [torch.randperm(num_updates, generator=g, device=g.device).cpu() for g in block_generators]  # S x [U]
    table = torch.stack(deals) if deals else torch.empty((0, num_updates), dtype=torch.long)  # [S, U]: part of row
    rows = torch.arange(size).unsqueeze(1) * num_updates  # [S, 1]: first row of each block
    # Row j*U + deal_j[k] goes to part k: invert each block's deal.
    members = rows + torch.argsort(table, dim=1)  # [S, U]: column k holds part k's row of each block
    return [members[:, k].contiguous() for k in range(num_updates)]


def part_chunks(part: Part, num_samples: int, micro_batch_size: int) -> list[Part]:
    """The training chunks (at most ``micro_batch_size`` rows each) of one actor-update part."""
    if isinstance(part, slice):
        return split_rows(num_samples, micro_batch_size)
    return [part[start:start + micro_batch_size] for start in range(0, part.numel(), micro_batch_size)]


@dataclass
class ChunkStats:
    """Sums over training chunks (each chunk adds its means; divide by ``chunks``). All-reduced by name."""

    policy_loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    ratio_mean: float = 0.0
    nonfinite_losses: float = 0.0
    chunks: float = 0.0

    def add(self, out, finite: bool) -> None:
        """Add one ChunkObjective (its detached floats)."""
        self.policy_loss += out.policy_loss
        self.kl += out.kl
        self.clip_fraction += out.clip_fraction
        self.ratio_mean += out.ratio_mean
        self.nonfinite_losses += 0.0 if finite else 1.0
        self.chunks += 1.0

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "ChunkStats":
        return cls(**{f.name: float(v) for f, v in zip(fields(cls), values.tolist())})


@dataclass(frozen=True)
class OptimizerStepRecord:
    """One optimizer step of a GRPO step (rank-local), for the logs and tests.

    kind: 'policy' | 'kl' | 'policy+kl' (per_timestep) | 'sft' | 'rollout' (per_rollout); lr: the learning rate the
    step used; ratio_mean / ratio_max_dev / clip_fraction over the policy chunks it saw (NaN for 'sft' and for
    'kl' under --kl_forward shared, which runs no forward of its own).
    """

    kind: str
    lr: float
    applied: bool
    ratio_mean: float
    ratio_max_dev: float
    clip_fraction: float

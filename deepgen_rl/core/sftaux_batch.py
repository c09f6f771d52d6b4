"""How one GRPO step's global SFT-aux batch is split over ranks, and how a rank's loss is normalised so that the
gradient DeepSpeed averages over the ranks is the mean over ALL items of the step, whatever the world size.

The step's SFT-aux batch is K = --sftaux_global_batch_size items with global indices 0 .. K - 1 (each item's draws
keyed by its global index: aux_data.py, trainer/global_draws.py). Rank r of W takes a contiguous slice: the first
K mod W ranks take ceil(K / W) items, the others floor(K / W) (0 when W > K). Rank r's loss is

    L_r = (sum of its items' losses) / (K / W) = mean over its n_r items x n_r W / K,

so DeepSpeed's average over ranks gives (1 / W) sum_r L_r = (1 / K) sum over all K items: the same on 1 rank as
on W. A rank with no item still runs one zero-weight item (``phantom``): ZeRO reduces the gradients in buckets
filled by each parameter's backward hook, so every rank must run the same backward graph.

Legend: K global items, W ranks, r the rank, n_r its items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RankItems:
    """Rank r's share of the step's K items: global indices ``first`` .. ``first + count - 1``."""

    first: int
    count: int  # n_r, 0 when W > K and r >= K
    global_batch_size: int  # K
    world_size: int  # W

    @property
    def loss_scale(self) -> float:
        """n_r W / K: multiplies the mean over the rank's items to give its share L_r (0 for no item)."""
        return self.count * self.world_size / self.global_batch_size

    @property
    def drawn(self) -> tuple[int, int]:
        """(first, count) of the items the rank actually runs: its own, or one phantom (item 0, weight 0)."""
        return (self.first, self.count) if self.count else (0, 1)

    @property
    def phantom(self) -> bool:
        return self.count == 0


def rank_items(global_batch_size: int, world_size: int, rank: int) -> RankItems:
    """Rank ``rank``'s contiguous slice of the K = ``global_batch_size`` items (the first K mod W ranks take one
    more). Raises ValueError naming --sftaux_global_batch_size when K <= 0."""
    if global_batch_size <= 0:
        raise ValueError(f"--sftaux_global_batch_size must be positive; got {global_batch_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world size {world_size}.")
    base, extra = divmod(global_batch_size, world_size)
    first = rank * base + min(rank, extra)
    return RankItems(first=first, count=base + (1 if rank < extra else 0), global_batch_size=global_batch_size,
                     world_size=world_size)


def max_items_per_rank(global_batch_size: int, world_size: int) -> int:
    """ceil(K / W): the most items one rank runs (the memory and FLOP peak; a rank with none runs one phantom)."""
    return max(1, math.ceil(global_batch_size / world_size))

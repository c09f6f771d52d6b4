"""Which rank generates which eval image, in which batches, and (under ZeRO-3) how the ranks stay in step.

Every (dataset, prompt, duplicate) is one image; the global list is dealt round-robin over the ranks (image k ->
rank k % world_size) and each rank cuts its share into generation batches of one dataset each.

ZeRO-3 partitions the trained parameters: every forward gathers them with collectives that all ranks must enter
together, so every rank must run the SAME sequence of generation forwards. Shares differ by one image, and a batch
plan that differs by rank would leave one rank waiting in a gather no other rank enters. ``lockstep_batches``
therefore gives every rank, for each dataset in turn, as many batches as the rank with the most batches of that
dataset, padding the shorter lists with a one-image batch of that dataset whose image is generated and dropped
(the dataset's cfg_scale and step count decide how many forwards a batch runs, so padding uses the same ones).
``Lockstep.agree`` makes every stop decision (deadline passed, judge unreachable, a failed batch) collective, so
the ranks also skip the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from deepgen_rl.core.distributed import all_reduce
from deepgen_rl.eval.dataset import BenchPrompt, EvalDataset


@dataclass(frozen=True)
class WorkItem:
    """One image to generate and judge; ``item_id`` is its position in the global plan."""

    dataset: int  # position in the datasets list
    prompt: BenchPrompt
    duplicate: int
    item_id: int


@dataclass(frozen=True)
class GenerationBatch:
    """Images generated together (one dataset); ``padding``: generated only to keep ZeRO-3 ranks in step."""

    dataset: int
    items: tuple[WorkItem, ...]
    padding: bool = False


def plan_work(datasets: Sequence[EvalDataset]) -> list[WorkItem]:
    """Every (dataset, prompt, duplicate) in a fixed order: the same on every rank."""
    items = []
    for position, dataset in enumerate(datasets):
        for prompt in dataset.prompts:
            for duplicate in range(dataset.spec.duplicates):
                items.append(WorkItem(position, prompt, duplicate, len(items)))
    return items


def shard_work(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """This rank's share, round-robin: shares differ by at most one image."""
    return list(items[rank::world_size])


def generation_batches(items: Sequence[WorkItem], micro_batch_size: int) -> list[list[WorkItem]]:
    """Consecutive items of one dataset (same cfg_scale and steps), at most ``micro_batch_size`` per batch."""
    batches: list[list[WorkItem]] = []
    for item in items:
        if batches and batches[-1][0].dataset == item.dataset and len(batches[-1]) < micro_batch_size:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def rank_batches(plan: Sequence[WorkItem], rank: int, world_size: int, micro_batch_size: int
                 ) -> list[GenerationBatch]:
    """This rank's share in generation batches (no padding: ranks may run different numbers of forwards)."""
    return [GenerationBatch(batch[0].dataset, tuple(batch))
            for batch in generation_batches(shard_work(plan, rank, world_size), micro_batch_size)]


def lockstep_batches(plan: Sequence[WorkItem], rank: int, world_size: int, micro_batch_size: int
                     ) -> list[GenerationBatch]:
    """This rank's batches padded so that every rank runs the same datasets' batches in the same order."""
    per_rank = [rank_batches(plan, r, world_size, micro_batch_size) for r in range(world_size)]
    first_item: dict[int, WorkItem] = {}
    for item in plan:
        first_item.setdefault(item.dataset, item)
    batches: list[GenerationBatch] = []
    for dataset in sorted(first_item):
        counts = [sum(b.dataset == dataset for b in rank_list) for rank_list in per_rank]
        own = [b for b in per_rank[rank] if b.dataset == dataset]
        padding = [GenerationBatch(dataset, (first_item[dataset],), padding=True)] * (max(counts) - len(own))
        batches += own + padding
    return batches


class Lockstep:
    """Collective yes/no decisions over a (gloo) group: what one rank cannot do, no rank does."""

    def __init__(self, group) -> None:
        self.group = group

    def agree(self, ok: bool) -> bool:
        """True iff ``ok`` on every rank (collective: every rank must call it the same number of times)."""
        flag = torch.tensor([1.0 if ok else 0.0])
        return bool(all_reduce(flag, torch.device("cpu"), "min", group=self.group).item() > 0)


def agree(lockstep: Optional[Lockstep], ok: bool) -> bool:
    """``lockstep.agree(ok)``, or ``ok`` itself when ranks need not stay in step."""
    return ok if lockstep is None else lockstep.agree(ok)

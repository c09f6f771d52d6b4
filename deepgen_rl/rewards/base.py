"""What every reward function returns, and the one signature they share.

A reward function scores N images (legend: N = B*G samples, B prompts, G group size) against their prompts:

    scores = reward.score(images, prompts, group_ids)   # images: N PIL images, prompts: N str, group_ids: N int

``group_ids[i]`` names the prompt group of sample i (samples of one prompt share it); pairwise rewards
(UnifiedReward-Think) compare images within a group, the others ignore it.

A sample whose reward cannot be computed (server down after retries, unparseable reply, no target text)
gets ``None`` and an error message: it is excluded from its group and counted by the reward step, never
scored 0 or 0.5 (the DeepGen-RL reference does that, and GRPO then learns from fake rewards).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, runtime_checkable

from PIL import Image


@dataclass
class RewardScores:
    """Per-sample results of one reward on one batch.

    values: [N] floats, ``None`` where the reward failed; errors: [N], the reason for each ``None``;
    metrics: scalars worth logging (e.g. the answer-parse success rate of a judge model).
    """

    values: list[Optional[float]]
    errors: list[Optional[str]]
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.values) != len(self.errors):
            raise ValueError(f"RewardScores: {len(self.values)} values but {len(self.errors)} errors.")
        for i, (value, error) in enumerate(zip(self.values, self.errors)):
            if (value is None) != (error is not None):
                raise ValueError(f"RewardScores: sample {i} must have exactly one of a value or an error "
                                 f"(value={value!r}, error={error!r}).")

    @property
    def num_failed(self) -> int:
        return sum(value is None for value in self.values)

    @classmethod
    def all_failed(cls, n: int, message: str) -> "RewardScores":
        return cls(values=[None] * n, errors=[message] * n)


@runtime_checkable
class RewardFunction(Protocol):
    """The interface the reward step calls. ``name`` is the reward's name in the dataset YAML.

    ``score_range``: the (low, high) every valid score lies in; a value outside it (a broken server's 1e30) is a
    failure, never a reward. ``service``: where the reward is computed and how to bring it back (a server's URL
    and start script), for the messages of a run that stops because the reward keeps failing.
    """

    name: str
    score_range: tuple[float, float]
    service: str

    def check_ready(self) -> None:
        """Raise a clear error if the reward cannot work (server down, model missing); no-op for local rewards."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        """Score N images against their prompts; never raises for a per-sample failure."""

    def close(self) -> None:
        """Release connections / models."""


def check_batch(images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> int:
    """Validate the three parallel lists of a reward call and return N."""
    n = len(images)
    if len(prompts) != n or len(group_ids) != n:
        raise ValueError(f"reward inputs differ in length: {n} images, {len(prompts)} prompts, "
                         f"{len(group_ids)} group ids.")
    return n


def groups_by_id(group_ids: Sequence[int]) -> "OrderedDict[int, list[int]]":
    """Sample indices of each group, in first-seen order: {group_id: [i, ...]}."""
    groups: OrderedDict[int, list[int]] = OrderedDict()
    for index, group_id in enumerate(group_ids):
        groups.setdefault(int(group_id), []).append(index)
    return groups


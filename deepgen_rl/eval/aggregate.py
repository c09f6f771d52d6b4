"""UniGenBench accuracies from per-image judgements (pure functions;
docs/upstream_compatibility.md#eval-yaml-and-unigenbench-csv).

For one dataset, with s_ij in {0, 1} the judge's score of test point j on image i (every duplicate of every
prompt is one image):

    accuracy(dimension d) = sum_{i,j: dim(j) = d} s_ij / #{(i, j): dim(j) = d}
    accuracy(test point t) = sum_{i,j: name(j) = t} s_ij / #{(i, j): name(j) = t}
    overall = sum_{i,j} s_ij / #{(i, j)}                      (all correct / all test points)

The sums run over judged images only: an image whose judgement failed (after retries) is excluded from every
sum and counted in ``failed_images`` / ``failed_test_points``, never scored 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

MAX_REPORTED_ERRORS = 20  # distinct failure messages kept in a report (the counts are exact)


@dataclass(frozen=True)
class ImageJudgement:
    """The judge's verdict on one image: ``scores[j]`` for ``test_points[j]``, or ``error`` when it failed."""

    dataset: str
    index: int
    duplicate: int
    test_points: tuple[str, ...]
    primary_dimensions: tuple[str, ...]
    scores: Optional[tuple[int, ...]]
    error: Optional[str]
    attempts: int = 0
    reply: str = ""

    def __post_init__(self) -> None:
        if (self.scores is None) == (self.error is None):
            raise ValueError(f"ImageJudgement {self.dataset}[{self.index}].{self.duplicate}: exactly one of scores "
                             f"or error must be set (scores={self.scores!r}, error={self.error!r}).")
        if len(self.primary_dimensions) != len(self.test_points):
            raise ValueError("ImageJudgement: one primary dimension per test point is required.")
        if self.scores is not None and len(self.scores) != len(self.test_points):
            raise ValueError(f"ImageJudgement {self.dataset}[{self.index}].{self.duplicate}: {len(self.scores)} "
                             f"scores for {len(self.test_points)} test points.")

    @property
    def ok(self) -> bool:
        return self.scores is not None


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> Optional[float]:
        """correct / total; None when nothing was judged (never a made-up 0)."""
        return self.correct / self.total if self.total else None


@dataclass
class DatasetScores:
    """Accuracies of one eval dataset. Dict keys keep first-seen order of the CSV's test points."""

    name: str
    overall: Accuracy
    per_dimension: dict[str, Accuracy]
    per_test_point: dict[str, Accuracy]
    num_images: int
    failed_images: int
    failed_test_points: int
    errors: list[str] = field(default_factory=list)


def _add(table: dict[str, list[int]], key: str, score: int) -> None:
    table[key][0] += score
    table[key][1] += 1


def aggregate_dataset(name: str, judgements: Iterable[ImageJudgement]) -> DatasetScores:
    """Accuracy per primary dimension, per test point and overall over the judged images of ``name``."""
    per_dimension: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [correct, total]
    per_test_point: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = total = num_images = failed_images = failed_test_points = 0
    errors: list[str] = []
    for judgement in judgements:
        if judgement.dataset != name:
            continue
        num_images += 1
        if judgement.scores is None:
            failed_images += 1
            failed_test_points += len(judgement.test_points)
            if judgement.error not in errors and len(errors) < MAX_REPORTED_ERRORS:
                errors.append(str(judgement.error))
            continue
        for point, dimension, score in zip(judgement.test_points, judgement.primary_dimensions, judgement.scores):
            _add(per_dimension, dimension, score)
            _add(per_test_point, point, score)
            correct += score
            total += 1
    return DatasetScores(
        name=name, overall=Accuracy(correct, total),
        per_dimension={key: Accuracy(*counts) for key, counts in per_dimension.items()},
        per_test_point={key: Accuracy(*counts) for key, counts in per_test_point.items()},
        num_images=num_images, failed_images=failed_images, failed_test_points=failed_test_points, errors=errors,
    )


def aggregate(dataset_names: Sequence[str], judgements: Sequence[ImageJudgement]) -> list[DatasetScores]:
    """One :class:`DatasetScores` per name, in the given order."""
    return [aggregate_dataset(name, judgements) for name in dataset_names]


def sort_judgements(judgements: Iterable[ImageJudgement]) -> list[ImageJudgement]:
    """Deterministic order (dataset, prompt index, duplicate) whatever rank judged what."""
    return sorted(judgements, key=lambda j: (j.dataset, j.index, j.duplicate))

"""Aggregation against accuracies worked out by hand, and against a brute-force recount on random data."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from deepgen_rl.eval.aggregate import ImageJudgement, aggregate, aggregate_dataset, sort_judgements
from deepgen_rl.eval.dataset import EvalDatasetSpec, primary_dimension
from deepgen_rl.eval.report import DatasetReport, EvalReport, metrics_for_logging


def _judged(index, duplicate, points, scores, dataset="bench", language="en"):
    return ImageJudgement(dataset=dataset, index=index, duplicate=duplicate, test_points=tuple(points),
                          primary_dimensions=tuple(primary_dimension(p, language) for p in points),
                          scores=None if scores is None else tuple(scores),
                          error="judge failed" if scores is None else None)


P0 = ["Style", "Attribute - Color", "Attribute - Quantity"]
P1 = ["Attribute - Shape", "World Knowledge"]
P2 = ["Style", "Action - State", "Attribute - Color"]
HAND_EXAMPLE = [
    _judged(0, 0, P0, [1, 1, 0]),
    _judged(0, 1, P0, [0, 1, 1]),
    _judged(1, 0, P1, None),          # failed: 2 test points excluded
    _judged(1, 1, P1, [0, 1]),
    _judged(2, 0, P2, [1, 0, 1]),
    _judged(2, 1, P2, None),          # failed: 3 test points excluded
    _judged(0, 0, P0, [0, 0, 0], dataset="other"),  # another dataset: never mixed in
]


def test_hand_worked_accuracies():
    scores = aggregate_dataset("bench", HAND_EXAMPLE)
    # Judged images: (0,0) (0,1) (1,1) (2,0) with 3 + 3 + 2 + 3 = 11 test points, 2 + 2 + 1 + 2 = 7 correct.
    assert (scores.overall.correct, scores.overall.total) == (7, 11)
    assert scores.overall.value == pytest.approx(7 / 11)
    # Style: 1, 0, 1 -> 2/3. Attribute: Color 1, 1, 1 + Quantity 0, 1 + Shape 0 -> 4/6.
    # World Knowledge: 1/1. Action: State 0 -> 0/1.
    dims = {key: (acc.correct, acc.total) for key, acc in scores.per_dimension.items()}
    assert dims == {"Style": (2, 3), "Attribute": (4, 6), "World Knowledge": (1, 1), "Action": (0, 1)}
    points = {key: (acc.correct, acc.total) for key, acc in scores.per_test_point.items()}
    assert points == {"Style": (2, 3), "Attribute - Color": (3, 3), "Attribute - Quantity": (1, 2),
                      "Attribute - Shape": (0, 1), "World Knowledge": (1, 1), "Action - State": (0, 1)}
    assert (scores.num_images, scores.failed_images, scores.failed_test_points) == (6, 2, 5)
    assert scores.errors == ["judge failed"]
    other = aggregate_dataset("other", HAND_EXAMPLE)
    assert (other.overall.correct, other.overall.total, other.num_images) == (0, 3, 1)


def test_nothing_judged_has_no_accuracy():
    scores = aggregate_dataset("bench", [_judged(0, 0, P0, None)])
    assert scores.overall.total == 0 and scores.overall.value is None
    assert scores.per_dimension == {} and scores.failed_test_points == 3


def test_random_judgements_match_brute_force_recount():
    rng = random.Random(0)
    names = ["Style", "World Knowledge", "Attribute - Color", "Attribute - Size", "Action - State",
             "Grammar - Negation"]
    judgements = []
    for index in range(40):
        points = rng.sample(names, rng.randint(1, 4))
        for duplicate in range(3):
            scores = None if rng.random() < 0.2 else [rng.randint(0, 1) for _ in points]
            judgements.append(_judged(index, duplicate, points, scores))
    rng.shuffle(judgements)
    result = aggregate(["bench"], judgements)[0]
    # Recount per (image, test point) cell from scratch, with exact fractions.
    cells = [(point, score) for j in judgements if j.scores is not None
             for point, score in zip(j.test_points, j.scores)]
    assert Fraction(result.overall.correct, result.overall.total) == Fraction(sum(s for _, s in cells), len(cells))
    for name in names:
        mine = [s for point, s in cells if point == name]
        assert (result.per_test_point[name].correct, result.per_test_point[name].total) == (sum(mine), len(mine))
    for dimension in {n.split(" - ")[0] for n in names}:
        mine = [s for point, s in cells if point.split(" - ")[0] == dimension]
        accuracy = result.per_dimension[dimension]
        assert (accuracy.correct, accuracy.total) == (sum(mine), len(mine))
    assert result.failed_images == sum(j.scores is None for j in judgements)
    ordered = [(j.index, j.duplicate) for j in sort_judgements(judgements)]
    assert ordered == [(i, d) for i in range(40) for d in range(3)]


def test_judgement_invariants():
    with pytest.raises(ValueError, match="exactly one of scores or error"):
        ImageJudgement("bench", 0, 0, ("Style",), ("Style",), scores=(1,), error="x")
    with pytest.raises(ValueError, match="2 scores for 1 test points"):
        ImageJudgement("bench", 0, 0, ("Style",), ("Style",), scores=(1, 0), error=None)


def test_metrics_for_logging_keys_and_values(tmp_path):
    spec = EvalDatasetSpec(name="unigenbench_en", path=tmp_path / "x.csv", cfg_scale=4.0, num_inference_steps=50,
                           duplicates=2, scoring="unigenbench/en", language="en")
    judgements = [j for j in HAND_EXAMPLE if j.dataset == "bench"]
    renamed = [ImageJudgement(**{**j.__dict__, "dataset": "unigenbench_en"}) for j in judgements]
    scores = aggregate_dataset("unigenbench_en", renamed)
    report = EvalReport(step=10, datasets=[DatasetReport(spec=spec, scores=scores, planned_images=8)], elapsed_s=2.5,
                        world_size=1, complete=True)
    metrics = metrics_for_logging(report)
    assert metrics["eval/unigenbench_en/overall"] == pytest.approx(7 / 11)
    assert metrics["eval/unigenbench_en/overall_se"] == pytest.approx((7 / 11 * 4 / 11 / 11) ** 0.5)  # binomial
    assert metrics["eval/unigenbench_en/Attribute"] == pytest.approx(4 / 6)
    assert metrics["eval/unigenbench_en/Style"] == pytest.approx(2 / 3)
    assert metrics["eval/unigenbench_en/Action"] == 0.0
    assert metrics["eval/unigenbench_en/failed_images"] == 2.0
    assert metrics["eval/unigenbench_en/judged_images"] == 4.0
    assert metrics["eval/unigenbench_en/missing_images"] == 2.0  # 8 planned, 6 reported
    assert metrics["eval/time_s"] == 2.5 and metrics["eval/complete"] == 1.0
    assert all(isinstance(value, float) for value in metrics.values())

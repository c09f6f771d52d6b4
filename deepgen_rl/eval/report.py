"""The typed result of one evaluation, its files (JSON + CSV) and its scalars for wandb/swanlab.

Files written under the evaluation's output folder (rank 0 only)::

    report.json       step, timing, per dataset: overall / per-dimension / per-test-point accuracies
                      (correct, total, accuracy), planned / judged / failed / missing images, failure messages
    summary.csv       dataset,level,name,correct,total,accuracy     (level: overall | dimension | test_point)
    judgements.csv    one row per image: dataset,index,duplicate,test_points,scores,error,attempts,reply
    samples/<dataset>/<index>_<duplicate>.png   the first generated images (written by the runner)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from deepgen_rl.eval.aggregate import Accuracy, DatasetScores, ImageJudgement
from deepgen_rl.eval.dataset import EvalDatasetSpec

REPORT_JSON = "report.json"
SUMMARY_CSV = "summary.csv"
JUDGEMENTS_CSV = "judgements.csv"
SAMPLES_DIR = "samples"
METRIC_PREFIX = "eval"


@dataclass
class DatasetReport:
    spec: EvalDatasetSpec
    scores: DatasetScores
    planned_images: int  # prompts x duplicates; planned - judged - failed = images whose rank never reported

    @property
    def missing_images(self) -> int:
        return self.planned_images - self.scores.num_images


@dataclass
class EvalReport:
    """One evaluation. ``complete`` is True only when every planned image was judged: False when some rank's
    results did not arrive before the deadline or the judge failed on an image (unreachable, a malformed reply
    after its retries); the accuracies then cover the images that were judged."""

    step: int
    datasets: list[DatasetReport]
    elapsed_s: float
    world_size: int
    complete: bool
    output_dir: Optional[str] = None
    judgements: list[ImageJudgement] = field(default_factory=list, repr=False)

    def dataset(self, name: str) -> DatasetReport:
        for report in self.datasets:
            if report.spec.name == name:
                return report
        raise KeyError(f"no eval dataset named {name!r}; have {[r.spec.name for r in self.datasets]}")


def _accuracy_dict(accuracy: Accuracy) -> dict:
    return {"correct": accuracy.correct, "total": accuracy.total, "accuracy": accuracy.value}


def report_to_dict(report: EvalReport) -> dict:
    """JSON-ready summary (no per-image rows: those go to judgements.csv)."""
    datasets = []
    for entry in report.datasets:
        spec, scores = entry.spec, entry.scores
        datasets.append({
            "name": spec.name, "path": str(spec.path), "scoring": spec.scoring, "cfg_scale": spec.cfg_scale,
            "num_inference_steps": spec.num_inference_steps, "duplicates": spec.duplicates,
            "planned_images": entry.planned_images, "judged_images": scores.num_images - scores.failed_images,
            "failed_images": scores.failed_images, "failed_test_points": scores.failed_test_points,
            "missing_images": entry.missing_images,
            "overall": _accuracy_dict(scores.overall),
            "dimensions": {key: _accuracy_dict(value) for key, value in scores.per_dimension.items()},
            "test_points": {key: _accuracy_dict(value) for key, value in scores.per_test_point.items()},
            "errors": scores.errors,
        })
    return {"step": report.step, "elapsed_s": round(report.elapsed_s, 3), "world_size": report.world_size,
            "complete": report.complete, "datasets": datasets}


def write_report(report: EvalReport, output_dir: str | Path) -> Path:
    """Write report.json, summary.csv and judgements.csv into ``output_dir``; returns the folder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report_to_dict(report), indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    with (folder / SUMMARY_CSV).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "level", "name", "correct", "total", "accuracy"])
        for entry in report.datasets:
            scores = entry.scores
            rows = [("overall", "overall", scores.overall)]
            rows += [("dimension", key, value) for key, value in scores.per_dimension.items()]
            rows += [("test_point", key, value) for key, value in scores.per_test_point.items()]
            for level, name, accuracy in rows:
                value = "" if accuracy.value is None else f"{accuracy.value:.6f}"
                writer.writerow([entry.spec.name, level, name, accuracy.correct, accuracy.total, value])
    with (folder / JUDGEMENTS_CSV).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "index", "duplicate", "test_points", "scores", "error", "attempts", "reply"])
        for judgement in report.judgements:
            writer.writerow([
                judgement.dataset, judgement.index, judgement.duplicate,
                json.dumps(list(judgement.test_points), ensure_ascii=False),
                "" if judgement.scores is None else json.dumps(list(judgement.scores)),
                judgement.error or "", judgement.attempts, judgement.reply,
            ])
    return folder


def metrics_for_logging(report: EvalReport) -> dict[str, float]:
    """Flat scalars: ``eval/<dataset>/overall`` (and its standard error ``overall_se``),
    ``eval/<dataset>/<primary dimension>`` (e.g.
    ``eval/unigenbench_en/Attribute``), failure counts and the evaluation time. An accuracy over zero judged
    test points is left out (never logged as 0)."""
    metrics: dict[str, float] = {}
    for entry in report.datasets:
        prefix = f"{METRIC_PREFIX}/{entry.spec.name}"
        scores = entry.scores
        if scores.overall.value is not None:
            metrics[f"{prefix}/overall"] = scores.overall.value
            # its binomial standard error over the test points (the reward-hacking monitor's measure of eval
            # noise, docs/monitoring.md; test points of one image are not independent, so it is a lower bound)
            p, total = scores.overall.value, scores.overall.total
            metrics[f"{prefix}/overall_se"] = math.sqrt(p * (1.0 - p) / total)
        for dimension, accuracy in scores.per_dimension.items():
            if accuracy.value is not None:
                metrics[f"{prefix}/{dimension}"] = accuracy.value
        metrics[f"{prefix}/judged_images"] = float(scores.num_images - scores.failed_images)
        metrics[f"{prefix}/failed_images"] = float(scores.failed_images)
        metrics[f"{prefix}/missing_images"] = float(entry.missing_images)
    metrics[f"{METRIC_PREFIX}/time_s"] = float(report.elapsed_s)
    metrics[f"{METRIC_PREFIX}/complete"] = 1.0 if report.complete else 0.0
    return metrics

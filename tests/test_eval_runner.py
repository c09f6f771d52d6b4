"""The evaluation runner end to end against the stand-in judge: hand-worked accuracies, failures, deadlines,
the tiny DeepGen model through the trainer hook and the CLI, and the spread over two gloo ranks."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from deepgen_rl.eval.dataset import load_eval_datasets
from deepgen_rl.config import EvalArguments, JudgeArguments
from deepgen_rl.eval.report import JUDGEMENTS_CSV, REPORT_JSON, SAMPLES_DIR, SUMMARY_CSV, metrics_for_logging
from deepgen_rl.eval.runner import GenerationSettings, plan_work, run_evaluation, shard_work
from tests.servers.fake_judge import MALFORMED, MALFORMED_ONCE, NORMAL, SLOW, WRONG_LENGTH, FakeJudge, encode_verdict

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVED = "UniGenBench-EvalModel-qwen3vl-32b-v1"
POINTS = {
    0: ["Style", "Attribute - Color", "Attribute - Quantity"],
    1: ["Attribute - Shape", "World Knowledge"],
    2: ["Style", "Action - State", "Attribute - Color"],
}
PROMPTS = {0: "a red fox in ink", 1: "a round stone, the Eiffel tower", 2: "a sleeping cat, watercolor, blue"}
# (prompt index, duplicate) -> (scores the judge gives, how it behaves)
VERDICTS = {
    (0, 0): ([1, 1, 0], NORMAL),
    (0, 1): ([0, 1, 1], MALFORMED_ONCE),  # retried, then scored
    (1, 0): ([1, 1], WRONG_LENGTH),       # retried, then reported
    (1, 1): ([0, 1], NORMAL),
    (2, 0): ([1, 0, 1], NORMAL),
    (2, 1): ([1, 1, 1], MALFORMED),       # retried, then reported
}


def write_bench(folder: Path, steps: int = 3, duplicates: int = 2, name: str = "bench") -> Path:
    """A 3-prompt UniGenBench CSV and its eval YAML; returns the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "bench.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "prompt", "sub_dims"])
        for index, points in POINTS.items():
            sub_dims = {"Primary Categories": "Art", "Testpoints": points,
                        "Testpoint Description": [p.lower() for p in points]}
            writer.writerow([index, PROMPTS[index], json.dumps(sub_dims)])
    (folder / "eval.yaml").write_text(
        f"datasets:\n  - name: {name}\n    path: bench.csv\n    cfg_scale: 4.0\n    num_inference_steps: {steps}\n"
        f"    duplicates: {duplicates}\n    scoring: unigenbench/en\n", encoding="utf-8")
    return folder / "eval.yaml"


class ColourGenerator:
    """generate_fn whose k-th image of a prompt carries VERDICTS[(prompt, k)] in its top-left pixel."""

    def __init__(self, verdicts=VERDICTS, delay_s: float = 0.0) -> None:
        self.verdicts = verdicts
        self.delay_s = delay_s
        self.calls: list[tuple[list[str], float, int, int]] = []
        self.counts: dict[str, int] = defaultdict(int)

    def __call__(self, prompts, cfg_scale, num_inference_steps, seed):
        self.calls.append((list(prompts), cfg_scale, num_inference_steps, seed))
        time.sleep(self.delay_s)
        images = []
        for prompt in prompts:
            index = next(i for i, text in PROMPTS.items() if text == prompt)
            duplicate = self.counts[prompt]
            self.counts[prompt] += 1
            scores, behaviour = self.verdicts[(index, duplicate)]
            images.append(Image.new("RGB", (16, 16), encode_verdict(scores, behaviour, tag=10 * index + duplicate)))
        return images


def judge_settings(url: str, **overrides) -> JudgeArguments:
    values = dict(unigenbench_api_url=url, unigenbench_model_name=SERVED, judge_timeout=10.0, judge_max_retries=2,
                  judge_retry_backoff=0.01, judge_max_concurrency=4, unigenbench_max_tokens=512,
                  judge_health_timeout=5.0)
    values.update(overrides)
    return JudgeArguments(**values)


def eval_settings(**overrides) -> GenerationSettings:
    values = dict(height=64, width=64, seed=100, micro_batch_size=4)
    values.update(overrides)
    return GenerationSettings(**values)


def eval_args(timeout_s: float = 60.0) -> EvalArguments:
    return EvalArguments(eval_timeout=timeout_s, eval_num_sample_images=3)


@pytest.fixture(scope="module")
def image_judge():
    with FakeJudge(slow_s=30.0) as server:
        yield server


def test_end_to_end_hand_worked_report(tmp_path, image_judge):
    datasets = load_eval_datasets(write_bench(tmp_path / "data"))
    generate = ColourGenerator()
    out = tmp_path / "report"
    report = run_evaluation(generate, judge_settings(image_judge.url), eval_args(), datasets, eval_settings(), out,
                            step=20)

    # Generation: the dataset's cfg_scale and steps, batches of <= 4 images, seed = base + first image id.
    a, b, c = PROMPTS.values()
    assert generate.calls == [([a, a, b, b], 4.0, 3, 100), ([c, c], 4.0, 3, 104)]
    # Same numbers as the hand-worked example of test_eval_aggregate: 7 of 11 test points, 2 images failed.
    scores = report.dataset("bench").scores
    assert (scores.overall.correct, scores.overall.total) == (7, 11)
    assert {k: (v.correct, v.total) for k, v in scores.per_dimension.items()} == {
        "Style": (2, 3), "Attribute": (4, 6), "World Knowledge": (1, 1), "Action": (0, 1)}
    assert (scores.failed_images, scores.failed_test_points, report.dataset("bench").missing_images) == (2, 5, 0)
    # Two images the judge failed on: the accuracies cover the judged ones and the evaluation is not complete.
    assert not report.complete and report.step == 20 and report.world_size == 1
    assert metrics_for_logging(report)["eval/complete"] == 0.0
    by_image = {(j.index, j.duplicate): j for j in report.judgements}
    assert by_image[(0, 1)].attempts == 2 and by_image[(0, 1)].scores == (0, 1, 1)
    assert by_image[(1, 0)].scores is None and "3 entries for 2 test points" in by_image[(1, 0)].error
    assert by_image[(2, 1)].scores is None and "no <score>" in by_image[(2, 1)].error

    saved = json.loads((out / REPORT_JSON).read_text())
    (entry,) = saved["datasets"]
    assert entry["overall"] == {"correct": 7, "total": 11, "accuracy": pytest.approx(7 / 11)}
    assert entry["dimensions"]["Attribute"]["accuracy"] == pytest.approx(4 / 6)
    assert entry["test_points"]["Attribute - Quantity"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert (entry["planned_images"], entry["judged_images"], entry["failed_images"]) == (6, 4, 2)
    with (out / SUMMARY_CSV).open() as handle:
        summary = {(r["level"], r["name"]): r for r in csv.DictReader(handle)}
    assert float(summary[("overall", "overall")]["accuracy"]) == pytest.approx(7 / 11)
    assert summary[("dimension", "Style")]["correct"] == "2" and summary[("dimension", "Style")]["total"] == "3"
    with (out / JUDGEMENTS_CSV).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["index"], r["duplicate"]) for r in rows] == [(str(i), str(d)) for i in range(3) for d in range(2)]
    assert json.loads(rows[0]["scores"]) == [1, 1, 0] and rows[2]["scores"] == "" and rows[2]["error"]
    samples = sorted(p.name for p in (out / SAMPLES_DIR / "bench").iterdir())
    assert samples == ["0_0.png", "0_1.png", "1_0.png"]  # num_sample_images = 3
    assert Image.open(out / SAMPLES_DIR / "bench" / "0_0.png").getpixel((0, 0)) == encode_verdict([1, 1, 0], NORMAL, 0)
    assert metrics_for_logging(report)["eval/bench/overall"] == pytest.approx(7 / 11)


def test_deadline_bounds_the_evaluation(tmp_path, image_judge):
    datasets = load_eval_datasets(write_bench(tmp_path / "data"))
    slow = {key: (scores, SLOW) for key, (scores, _) in VERDICTS.items()}  # the judge would take 30 s per image
    report = run_evaluation(ColourGenerator(slow), judge_settings(image_judge.url, judge_timeout=60.0), eval_args(2.0),
                            datasets, eval_settings(), tmp_path / "out", step=1)
    # Without the deadline the judge would answer after 30 s and every image would be scored.
    scores = report.dataset("bench").scores
    assert scores.failed_images == 6 and scores.overall.total == 0 and scores.overall.value is None
    assert all("deadline" in error for error in scores.errors)
    assert "eval/bench/overall" not in metrics_for_logging(report)  # nothing judged: no made-up accuracy


def test_generation_stops_at_the_deadline(tmp_path, image_judge):
    datasets = load_eval_datasets(write_bench(tmp_path / "data"))
    generate = ColourGenerator(delay_s=1.5)
    report = run_evaluation(generate, judge_settings(image_judge.url), eval_args(1.2), datasets,
                            eval_settings(micro_batch_size=2), tmp_path / "out", step=1)
    assert len(generate.calls) == 1  # the first batch overran the deadline: no more batches
    scores = report.dataset("bench").scores
    assert scores.failed_images >= 4
    assert any("not generated: evaluation deadline" in error for error in scores.errors)


def test_judge_down_skips_generation(tmp_path):
    datasets = load_eval_datasets(write_bench(tmp_path / "data"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        generate = ColourGenerator()
        report = run_evaluation(generate, judge_settings(url, judge_health_timeout=0.5), eval_args(), datasets,
                                eval_settings(), tmp_path / "out", step=1)
    assert generate.calls == []
    scores = report.dataset("bench").scores
    assert scores.failed_images == 6 and "scripts/eval_unigenbench_evalmodel.sh" in scores.errors[0]
    assert not report.complete and metrics_for_logging(report)["eval/complete"] == 0.0  # was 1.0 over 6 failures
    assert (tmp_path / "out" / REPORT_JSON).is_file()


# ---- the tiny DeepGen model ----

def name_rule_expectation(duplicates: int, passing: set[str]) -> tuple[int, int]:
    """(correct, total) when the judge scores a test point 1 iff its primary dimension is in ``passing``."""
    correct = total = 0
    for points in POINTS.values():
        for point in points:
            correct += duplicates * (point.split(" - ")[0] in passing)
            total += duplicates
    return correct, total


@pytest.fixture(scope="module")
def name_judge():
    with FakeJudge(rule="name", pass_dims="Style,Attribute") as server:
        yield server


def test_eval_hook_on_tiny_model(tmp_path, name_judge):
    from deepgen_rl.config import DataArguments, GRPOConfig
    from deepgen_rl.eval.dataset import EvalDataError
    from deepgen_rl.eval.runner import make_eval_hook
    from deepgen_rl.model.tiny import build_tiny_deepgen

    yaml_path = write_bench(tmp_path / "data", steps=2, duplicates=2, name="tiny_bench")
    training_args = GRPOConfig(output_dir=str(tmp_path / "run"), eval_freq=2, image_height=64, image_width=64,
                               report_to="none")
    evaluation = EvalArguments(eval_timeout=120.0, eval_num_sample_images=2)
    data_args = DataArguments(eval_dataset_config=str(yaml_path))
    judge_args = JudgeArguments(unigenbench_api_url=name_judge.url, judge_retry_backoff=0.01)
    model = build_tiny_deepgen(seed=0).train()
    # The trainer's hook (trainer/eval_hook.py): config read once at start-up, metrics back on every call.
    hook = make_eval_hook(training_args, data_args, judge_args, evaluation)
    metrics = hook(model, 4)
    assert model.training  # mode restored
    correct, total = name_rule_expectation(2, {"Style", "Attribute"})
    assert metrics["eval/tiny_bench/overall"] == pytest.approx(correct / total)
    assert metrics["eval/tiny_bench/Style"] == 1.0 and metrics["eval/tiny_bench/World Knowledge"] == 0.0
    assert metrics["eval/tiny_bench/failed_images"] == 0.0
    folder = tmp_path / "run" / "eval" / "step_4"
    assert (folder / REPORT_JSON).is_file() and (folder / SUMMARY_CSV).is_file()
    samples = sorted((folder / SAMPLES_DIR / "tiny_bench").iterdir())
    assert len(samples) == 2 and Image.open(samples[0]).size == (64, 64)
    with pytest.raises(EvalDataError, match="does not exist"):
        make_eval_hook(training_args, DataArguments(eval_dataset_config=str(tmp_path / "missing.yaml")), judge_args,
                       evaluation)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "deepgen_rl.eval", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_help():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--tiny", "--output_dir", "--unigenbench_api_url", "--eval_dataset_config", "--checkpoint"):
        assert flag in result.stdout


def test_cli_tiny_end_to_end(tmp_path, name_judge):
    yaml_path = write_bench(tmp_path / "data", steps=2, duplicates=1)
    out = tmp_path / "cli_out"
    result = _cli("--tiny", "--output_dir", str(out), "--eval_dataset_config", str(yaml_path),
                  "--unigenbench_api_url", name_judge.url, "--eval_max_prompts", "2", "--step", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / REPORT_JSON).read_text())
    correct = sum(p.split(" - ")[0] in {"Style", "Attribute"} for i in (0, 1) for p in POINTS[i])
    total = sum(len(POINTS[i]) for i in (0, 1))
    assert saved["step"] == 5 and saved["datasets"][0]["overall"]["correct"] == correct
    assert saved["datasets"][0]["overall"]["total"] == total and saved["datasets"][0]["planned_images"] == 2
    assert "eval/bench/overall" in result.stdout


# ---- two gloo ranks ----

def _rank_worker(rank: int, world_size: int, init_file: str, url: str, yaml_path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        datasets = load_eval_datasets(yaml_path)
        uniform = {key: (scores, NORMAL) for key, (scores, _) in VERDICTS.items()}
        results = {}
        for run, (timeout_s, stall) in enumerate([(60.0, 0.0), (3.0, 5.0), (60.0, 0.0)]):
            # Run 1: rank 1 stalls in generation past the deadline; rank 0 must not wait for it.
            # Run 2: a normal evaluation again (nothing left over from the missed barrier).
            generate = ColourGenerator(uniform, delay_s=stall if rank == 1 else 0.0)
            report = run_evaluation(generate, judge_settings(url), eval_args(timeout_s), datasets, eval_settings(),
                                    Path(out) / f"run{run}", step=run)
            scores = report.dataset("bench").scores
            results[run] = {"complete": report.complete,
                            "generated": [p for call in generate.calls for p in call[0]],
                            "counts": (scores.overall.correct, scores.overall.total, scores.num_images),
                            "images": sorted((j.index, j.duplicate) for j in report.judgements)}
        # Run 3, in lock-step (ZeRO-3): rank 1's first batch fails, so NO rank generates another batch.
        generate = ColourGenerator(uniform)
        report = run_evaluation(generate if rank == 0 else _failing, judge_settings(url), eval_args(60.0), datasets,
                                eval_settings(micro_batch_size=2), Path(out) / "run3", step=3, lockstep=True)
        results[3] = {"generated": [p for call in generate.calls for p in call[0]] if rank == 0 else None,
                      "judged": sorted((j.index, j.duplicate) for j in report.judgements if j.scores is not None),
                      "errors": sorted({j.error.split(" (")[0] for j in report.judgements if j.error})}
        (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def _failing(prompts, cfg_scale, num_inference_steps, seed):
    raise RuntimeError("out of memory (stand-in)")


def test_two_ranks_split_generation_and_judging(tmp_path, image_judge):
    import torch.multiprocessing as mp

    yaml_path = write_bench(tmp_path / "data")
    before = image_judge.stats()["counts"].get("chat", 0)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), image_judge.url, str(yaml_path), str(tmp_path)),
             nprocs=2, join=True)
    results = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]
    plan = plan_work(load_eval_datasets(yaml_path))
    for rank, result in enumerate(results):  # each rank generated exactly its round-robin share
        assert result[0]["generated"] == [item.prompt.prompt for item in shard_work(plan, rank, 2)]
    # Run 0: every image judged once, over both ranks; both ranks hold the same full report.
    all_scores = [s for scores, _ in VERDICTS.values() for s in scores]
    for result in results:
        for run in (0, 2):
            assert result[run]["complete"] and result[run]["counts"] == (sum(all_scores), len(all_scores), 6)
            assert result[run]["images"] == [(i, d) for i in range(3) for d in range(2)]
    assert image_judge.stats()["counts"]["chat"] - before >= 6
    # Run 1: rank 1 overran the 3 s deadline; rank 0 gave up on it at the deadline and reported its own share.
    assert not results[0][1]["complete"]  # had rank 0 waited for rank 1, it would hold the full report
    assert results[0][1]["images"] == sorted((item.prompt.index, item.duplicate) for item in shard_work(plan, 0, 2))
    assert not results[1][1]["complete"]
    report = json.loads((tmp_path / "run1" / REPORT_JSON).read_text())
    assert report["complete"] is False and report["datasets"][0]["missing_images"] == 3
    # Run 3 (lock-step): rank 0 ran its first batch (images 0 and 2 of the plan) and skipped its second with rank 1.
    assert results[0][3]["generated"] == [PROMPTS[0], PROMPTS[1]]
    for result in results:
        assert result[3]["judged"] == [(0, 0), (1, 0)]
        assert result[3]["errors"] == ["generation failed: RuntimeError: out of memory",
                                       "not generated: an earlier batch failed",
                                       "not generated: another rank stopped"]


def test_lockstep_batches_pad_every_rank_to_the_same_plan(tmp_path):
    """ZeRO-3 evaluation: every rank runs the same datasets' batches in the same order (padding included)."""
    from deepgen_rl.eval.sharding import lockstep_batches, rank_batches

    first = load_eval_datasets(write_bench(tmp_path / "a", duplicates=2, name="first"))  # 6 images
    second = load_eval_datasets(write_bench(tmp_path / "b", duplicates=1, name="second"))  # 3 images
    plan = plan_work(first + second)
    # 4 ranks, batches of <= 2: rank 1 gets images 1 and 5, both of the first dataset; the others one of each.
    per_rank = [rank_batches(plan, rank, 4, 2) for rank in range(4)]
    assert [len(b) for b in per_rank] == [2, 1, 2, 2]
    padded = [lockstep_batches(plan, rank, 4, 2) for rank in range(4)]
    assert [[b.dataset for b in batches] for batches in padded] == [[0, 1]] * 4
    assert [b.padding for b in padded[1]] == [False, True]  # its "second" batch is a dropped one-image padding
    assert padded[1][1].items == (plan[6],) and padded[1][1].dataset == 1
    # The real work is exactly the unpadded share of each rank: nothing lost, nothing judged twice.
    real = [item for batches in padded for b in batches if not b.padding for item in b.items]
    assert sorted(item.item_id for item in real) == list(range(len(plan)))

"""Rewards that fail (issue 11 item 1): out-of-range scores, the reward-phase deadline, the failure budget's
arithmetic and the run summary. The trainer-level stop is in test_trainer_failure_budget.py."""

from __future__ import annotations

import pytest
from PIL import Image

from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.ocr_client import OcrRewardClient
from deepgen_rl.rewards.reward_step import RewardStep
from deepgen_rl.trainer.failure_budget import FailureBudget, RunSummary, budget_verdict
from tests.reward_servers import fake_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def slow_server():
    """The fake OCR server; SLOW requests answer after 2 s."""
    with fake_server("--slow-seconds", "2") as server:
        yield server


def _ocr_step(url: str, deadline_s=None) -> RewardStep:
    client = OcrRewardClient(url, RetryPolicy(timeout_s=10.0, max_retries=0, backoff_s=0.01), max_concurrency=4,
                             request_batch_size=1, health_timeout_s=1.0)
    return RewardStep({"ocr": client}, deadline_s=deadline_s)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (51 * i % 256, 0, 0)) for i in range(n)]


def _score(step: RewardStep, prompts: list[str]):
    return step.score(_images(len(prompts)), prompts, [{"ocr": 1.0}] * len(prompts), list(range(len(prompts))))


def test_a_score_outside_the_declared_range_is_a_failure(slow_server):
    step = _ocr_step(slow_server.url)
    try:
        batch = _score(step, ['a sign "A"', 'a sign "HUGE"', 'a sign "B"'])
    finally:
        step.close()
    assert batch.failed.tolist() == [False, True, False]
    # The fake server scores the grey level / 255 (PIL's L conversion of the flat test image).
    expected = [image.convert("L").getpixel((0, 0)) / 255 for image in _images(3)]
    assert batch.scores[[0, 2], 0].tolist() == pytest.approx([expected[0], expected[2]], rel=1e-6)
    assert [(f.sample, f.message) for f in batch.failures] == [(1, "ocr returned 1e+30, outside its declared range "
                                                                   "[0, 1]")]
    assert batch.failure_counts["ocr"] == 1


def test_the_deadline_bounds_the_reward_phase_and_a_busy_reward_is_not_queued(slow_server):
    step = _ocr_step(slow_server.url, deadline_s=0.3)
    try:
        late = _score(step, ['a SLOW sign "A"', 'a SLOW sign "B"'])
        assert late.failed.all() and late.metrics["ocr/deadline_exceeded"] == 1.0
        assert all("did not finish within --reward_step_deadline (0.3 s)" in f.message for f in late.failures)
        busy = _score(step, ['a sign "A"'])  # the abandoned call still runs: this step does not wait behind it
        assert busy.failed.all() and "still busy" in busy.failures[0].message
        step._in_flight["ocr"].result(timeout=30)  # the server answers the abandoned call after its 2 s
        fine = _score(step, ['a sign "A"', 'a sign "B"'])
        assert not fine.failed.any()
    finally:
        step.close()


def test_budget_counts_consecutive_all_failed_steps_per_reward():
    budget = FailureBudget(max_failed_steps=2, max_failure_rate=1.0, window=5)
    assert budget.update(1, {"ocr": (8, 8), "clip": (8, 0)}) is None
    assert budget.update(2, {"ocr": (8, 7), "clip": (8, 0)}) is None  # one sample worked: the streak restarts
    assert budget.update(3, {"ocr": (8, 8), "clip": (8, 0)}) is None
    assert budget.update(4, {"ocr": (0, 0), "clip": (8, 0)}) is None  # ocr unused this step: neither
    verdict = budget.update(5, {"ocr": (4, 4), "clip": (8, 0)})
    assert verdict.reward == "ocr" and "in 2 consecutive steps (steps 4-5" in verdict.reason
    # A healthy /health buys one more budget, once per stretch of failures.
    assert budget.can_rescue("ocr")
    budget.rescue("ocr")
    assert budget.update(6, {"ocr": (8, 8)}) is None
    assert budget.update(7, {"ocr": (8, 8)}).reward == "ocr" and not budget.can_rescue("ocr")
    assert budget.update(8, {"ocr": (8, 1)}) is None and budget.can_rescue("ocr")  # it worked again


def test_budget_failure_rate_over_a_full_window():
    budget = FailureBudget(max_failed_steps=0, max_failure_rate=0.5, window=3)
    assert budget.update(1, {"ocr": (10, 10)}) is None  # window not full yet
    assert budget.update(2, {"ocr": (10, 2)}) is None
    verdict = budget.update(3, {"ocr": (10, 4)})  # 16 / 30 > 0.5
    assert verdict.reward == "ocr" and "failed on 16 of its 30 samples (53%) over the last 3 steps" in verdict.reason
    assert FailureBudget(0, 0.5, 3).update(1, {"ocr": (10, 10)}) is None
    exact = FailureBudget(max_failed_steps=0, max_failure_rate=0.5, window=2)
    exact.update(1, {"ocr": (10, 10)})
    assert exact.update(2, {"ocr": (10, 0)}) is None  # 10 / 20 is not above 0.5


def test_run_summary_text():
    summary = RunSummary()
    summary.add(True, {"ocr": (8, 0), "jpeg_compressibility": (8, 0)})
    summary.add(False, {"ocr": (8, 8), "jpeg_compressibility": (0, 0)})
    assert summary.text() == ("run summary: 1 step(s) trained, 1 skipped; failed samples per reward: ocr 8/16, "
                              "jpeg_compressibility 0/8")


def test_a_server_that_answers_health_gets_one_more_budget_then_the_message_names_it(slow_server):
    step = _ocr_step(slow_server.url)
    budget = FailureBudget(max_failed_steps=1, max_failure_rate=1.0, window=5)
    try:
        batch = _score(step, ['a sign "HUGE"', 'a sign "HUGE"'])  # the server is up but talks nonsense
        counts = {"ocr": (2, int(batch.failed.sum()))}
        assert budget_verdict(budget, step, 1, counts, batch.failures, "cpu") is None  # /health answers: go on
        message = budget_verdict(budget, step, 2, counts, batch.failures, "cpu")
    finally:
        step.close()
    assert message.startswith("reward 'ocr' failed on every one of its samples in 1 consecutive steps (steps 2-2")
    assert f"although it answers its health check (OCR server at {slow_server.url}: start it with `bash " \
           "scripts/reward_ocr.sh`" in message
    assert message.endswith("last error: ocr returned 1e+30, outside its declared range [0, 1].")


def test_a_reward_must_declare_its_range_and_service():
    class Undeclared:
        name = "mystery"

    with pytest.raises(TypeError, match=r"reward 'mystery' \(Undeclared\) must declare score_range"):
        RewardStep({"mystery": Undeclared()})
    Undeclared.score_range = (0.0, 1.0)
    with pytest.raises(TypeError, match=r"reward 'mystery' \(Undeclared\) must declare service"):
        RewardStep({"mystery": Undeclared()})

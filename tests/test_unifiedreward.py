"""UnifiedReward-Think client against a stand-in vLLM server of ours (a real process on 127.0.0.1).

The stand-in prefers the brighter image, so win rates of a group are known in closed form: the image with
the k-th lowest brightness among G wins k - 1 of its G - 1 comparisons.
"""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from deepgen_rl.rewards.http_utils import RetryPolicy, RewardServerUnavailable
from deepgen_rl.rewards.unifiedreward import PairVerdict, UnifiedRewardThinkClient, win_rates
from deepgen_rl.rewards.unifiedreward_template import (
    PAIRWISE_THINK_TEMPLATE,
    parse_pairwise_answer,
    render_pairwise_prompt,
)
from tests.reward_servers import fake_server, free_port

pytestmark = pytest.mark.timeout(120)

MAX_RETRIES = 2  # 3 attempts per pair


def gray(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def make_client(url: str, timeout_s: float = 5.0, concurrency: int = 32, model: str = "UnifiedReward"):
    policy = RetryPolicy(timeout_s=timeout_s, max_retries=MAX_RETRIES, backoff_s=0.01)
    return UnifiedRewardThinkClient(url, model, policy, max_concurrency=concurrency, max_tokens=512,
                                    health_timeout_s=2.0)


@pytest.fixture(scope="module")
def server():
    with fake_server("--slow-seconds", "3", "--lag-seconds", "0.3") as srv:
        yield srv


# ---------- pure parts ----------

@pytest.mark.parametrize("reply, expected", [
    ("<think>...</think>\n<answer>Image 1 is better</answer>", 1),
    ("<think>Image 1 is better?</think><answer> image 2 IS better </answer>", 2),
    ("<answer>Image 1 is better</answer> on reflection <answer>Image 2 is better</answer>", 2),  # the last one
    ("<answer>Image 1 is better, no, Image 2 is better</answer>", None),  # ambiguous
    ("<answer>Both are equal</answer>", None),
    ("Image 1 is better", None),  # no answer tag
    ("", None),
    (None, None),
])
def test_parse_pairwise_answer(reply, expected):
    assert parse_pairwise_answer(reply) == expected


def test_template_puts_caption_in_corner_brackets_and_keeps_braces():
    text = render_pairwise_prompt('A mug that says "{hello}"')
    assert '「A mug that says "{hello}"」' in text
    assert "<answer>" in PAIRWISE_THINK_TEMPLATE and "Image 1 is better" in text and "Image 2 is better" in text
    assert "{prompt}" not in text


def test_win_rates_hand_worked_with_a_failed_pair():
    # Group {0, 1, 2}: 0 beats 1, pair (0, 2) failed, 2 beats 1. Group {3}: a lone sample.
    verdicts = [PairVerdict(0, 1, 0, None, 1, 1), PairVerdict(0, 2, None, "timed out", 3, 0),
                PairVerdict(1, 2, 2, None, 1, 1)]
    scores = win_rates(4, [7, 7, 7, 9], verdicts)
    assert scores.values[:3] == [1.0, 0.0, 1.0]  # 1/1, 0/2, 1/1: the failed pair counts for nobody
    assert scores.values[3] is None and ">= 2 samples" in scores.errors[3]


def test_win_rates_image_whose_comparisons_all_failed_is_excluded():
    verdicts = [PairVerdict(0, 1, None, "HTTP 500", 3, 0)]
    scores = win_rates(2, [0, 0], verdicts)
    assert scores.values == [None, None]
    assert all("HTTP 500" in error for error in scores.errors)


# ---------- against the stand-in server ----------

def test_win_rates_of_hand_worked_groups(server):
    levels = [30, 200, 90, 150, 100, 50]
    images = [gray(v) for v in levels]
    prompts = ["a cat"] * 4 + ["a dog"] * 2
    client = make_client(server.url)
    try:
        scores = client.score(images, prompts, [0, 0, 0, 0, 1, 1])
    finally:
        client.close()
    # Group 0 brightness ranks 30 < 90 < 150 < 200 -> wins 0, 3, 1, 2 of 3; group 1: 100 beats 50.
    assert scores.values == pytest.approx([0 / 3, 3 / 3, 1 / 3, 2 / 3, 1.0, 0.0])
    assert scores.errors == [None] * 6
    assert scores.metrics["pairs"] == 6 + 1
    assert scores.metrics["pairs_judged"] == 7
    assert scores.metrics["answer_parse_rate"] == 1.0


def test_pairs_of_all_groups_are_in_flight_together():
    # Each LAG reply is held 0.3 s by the server, so concurrently sent pairs overlap there.
    with fake_server("--lag-seconds", "0.5") as srv:
        client = make_client(srv.url)
        try:
            scores = client.score([gray(v) for v in (10, 20, 30, 40, 50, 60)], ["LAG a"] * 3 + ["LAG b"] * 3,
                                  [0, 0, 0, 1, 1, 1])
        finally:
            client.close()
        assert scores.num_failed == 0
        assert srv.stats()["max_in_flight"] == 6  # 3 + 3 pairs, both groups at once


@pytest.mark.parametrize("fault", ["GARBAGE", "ERROR500", "BADJSON", "SLOW"])
def test_faulty_replies_are_retried_then_excluded_and_counted(server, fault):
    before = server.stats()["requests"].get(fault, 0)
    images = [gray(v) for v in (40, 80, 10, 20, 30)]
    prompts = ["a tree"] * 2 + [f"{fault} a house"] * 3
    client = make_client(server.url, timeout_s=0.5 if fault == "SLOW" else 5.0)
    try:
        scores = client.score(images, prompts, [0, 0, 1, 1, 1])
    finally:
        client.close()
    assert scores.values[:2] == [0.0, 1.0]  # the healthy group is unaffected
    assert scores.values[2:] == [None, None, None]
    assert all(error and "failed after 3 attempts" in error for error in scores.errors[2:])
    assert scores.num_failed == 3
    assert scores.metrics["pairs"] == 4 and scores.metrics["pairs_judged"] == 1
    # 3 pairs x 3 attempts reached the server
    assert server.stats()["requests"].get(fault, 0) - before == 3 * (MAX_RETRIES + 1)
    if fault == "GARBAGE":
        # 1 parsed reply (healthy pair) out of 1 + 9 replies
        assert scores.metrics["answer_parse_rate"] == pytest.approx(1 / 10)
        assert "no '<answer>" in scores.errors[2]


def test_transient_failure_recovers_on_retry(server):
    client = make_client(server.url)
    try:
        scores = client.score([gray(5), gray(250), gray(100)], ["FLAKY x"] * 3, [3, 3, 3])
    finally:
        client.close()
    assert scores.values == pytest.approx([0.0, 1.0, 0.5])
    assert scores.metrics["answer_parse_rate"] == 1.0  # a 503 is not a reply


def test_server_killed_mid_batch_fails_only_unanswered_pairs():
    srv = fake_server("--lag-seconds", "3").start()
    try:
        client = make_client(srv.url, timeout_s=10.0)
        images = [gray(v) for v in (10, 20, 30, 90, 80, 70)]
        prompts = ["fast one"] * 3 + ["LAG slow one"] * 3
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("scores", client.score(images, prompts,
                                                                                         [0, 0, 0, 1, 1, 1])))
        worker.start()
        deadline = time.monotonic() + 30
        # Wait until the fast group is answered (counted once its replies are sent) and the slow one is pending.
        while time.monotonic() < deadline:
            stats = srv.stats()
            if stats["answered"].get("OK", 0) == 3 and stats["requests"].get("LAG", 0) == 3:
                break
            time.sleep(0.05)
        srv.kill()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the client hung after the server died"
        client.close()
    finally:
        srv.stop()
    scores = result["scores"]
    assert scores.values[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert scores.values[3:] == [None, None, None]
    assert all("failed after 3 attempts" in error for error in scores.errors[3:])


def test_check_ready_names_url_and_script_when_down():
    url = f"http://127.0.0.1:{free_port()}"
    client = make_client(url)
    try:
        with pytest.raises(RewardServerUnavailable) as err:
            client.check_ready()
    finally:
        client.close()
    assert url in str(err.value) and "scripts/reward_unifiedreward.sh" in str(err.value)


def test_check_ready_names_the_served_model_mismatch(server):
    client = make_client(server.url, model="SomethingElse")
    try:
        with pytest.raises(RewardServerUnavailable, match="SomethingElse"):
            client.check_ready()
    finally:
        client.close()
    ok = make_client(server.url)
    try:
        ok.check_ready()
    finally:
        ok.close()

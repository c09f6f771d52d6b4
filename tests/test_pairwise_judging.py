"""Unbiased pairwise judging (issue 15 item 3): random / both pair orders, the logged Image-1 share and agreement,
and replies cut at max_tokens, against the stand-in vLLM server (a real process on 127.0.0.1)."""

from __future__ import annotations

import itertools
import statistics

import pytest
from PIL import Image

from deepgen_rl.config import RewardArguments
from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.pairwise import PairVerdict, order_rng, presentations, verdict_metrics, win_rates
from deepgen_rl.rewards.unifiedreward import UnifiedRewardThinkClient
from tests.reward_servers import fake_server

pytestmark = pytest.mark.timeout(180)

PAIRS_OF_4 = list(itertools.combinations(range(4), 2))


def gray(level: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (level, level, level))


def make_client(url: str, pair_order: str = "random", seed: int = 0) -> UnifiedRewardThinkClient:
    policy = RetryPolicy(timeout_s=10.0, max_retries=2, backoff_s=0.01)
    return UnifiedRewardThinkClient(url, "UnifiedReward", policy, max_concurrency=16, max_tokens=64,
                                    health_timeout_s=2.0, pair_order=pair_order, order_seed=seed)


@pytest.fixture(scope="module")
def server():
    with fake_server() as srv:
        yield srv


# ---------- pure parts ----------

def test_presentations_fixed_both_and_seeded_random():
    assert presentations(PAIRS_OF_4, "fixed") == PAIRS_OF_4
    assert presentations([(0, 1), (2, 3)], "both") == [(0, 1), (1, 0), (2, 3), (3, 2)]
    first = presentations(PAIRS_OF_4, "random", order_rng(7, 0, 3))
    assert first == presentations(PAIRS_OF_4, "random", order_rng(7, 0, 3))  # reproducible per (seed, rank, call)
    assert sorted(tuple(sorted(p)) for p in first) == PAIRS_OF_4  # every pair once, in some order
    draws = [presentations(PAIRS_OF_4, "random", order_rng(7, rank, call)) for rank in (0, 1) for call in range(50)]
    assert len({tuple(d) for d in draws}) > 20  # calls and ranks draw different orders
    flipped = [shown[0] > shown[1] for draw in draws for shown in draw]
    assert 0.4 < sum(flipped) / len(flipped) < 0.6  # 600 fair coin flips: 4.9 sigma either side


def test_always_image1_judge_gives_one_half_in_expectation_pure():
    # Verdicts of an always-"Image 1" judge: the first shown wins. Fixed order: index-ordered rewards (the bias).
    def rewards(order, rng=None):
        verdicts = [PairVerdict(a, b, a, None, 1, 1) for a, b in presentations(PAIRS_OF_4, order, rng)]
        return win_rates(4, [0] * 4, verdicts).values

    assert rewards("fixed") == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert rewards("both") == pytest.approx([0.5] * 4)  # each pair: one win each way -> 0.5
    per_index = list(zip(*[rewards("random", order_rng(0, 0, call)) for call in range(2000)]))
    # Each reward is a mean of 3 fair coins (sd 0.29); over 2000 calls the mean's sd is 0.0065.
    assert [statistics.mean(r) for r in per_index] == pytest.approx([0.5] * 4, abs=0.03)


def test_both_orders_average_and_agreement_hand_worked():
    # Pair (0, 1): both orders say 0 -> 1 win for 0. Pair (0, 2): orders disagree -> 0.5 each.
    # Pair (1, 2): one order failed -> the other (2 wins) counts alone.
    verdicts = [PairVerdict(0, 1, 0, None, 1, 1), PairVerdict(1, 0, 0, None, 1, 1),
                PairVerdict(0, 2, 0, None, 1, 1), PairVerdict(2, 0, 2, None, 1, 1),
                PairVerdict(1, 2, None, "cut", 1, 0, 1), PairVerdict(2, 1, 2, None, 1, 1)]
    scores = win_rates(3, [5, 5, 5], verdicts)
    assert scores.values == pytest.approx([(1 + 0.5) / 2, (0 + 0) / 2, (0.5 + 1) / 2])
    metrics = verdict_metrics(verdicts, num_pairs=3)
    assert metrics["pairs"] == 3 and metrics["requests"] == 6 and metrics["pairs_judged"] == 3
    assert metrics["both_orders_agreement"] == pytest.approx(1 / 2)  # (0,1) agrees, (0,2) does not; (1,2) once
    assert metrics["image1_share"] == pytest.approx(4 / 5)  # the winner was shown first in all but (1, 0) -> 0
    assert metrics["truncation_rate"] == pytest.approx(1 / 6) and metrics["answer_parse_rate"] == pytest.approx(5 / 6)


def test_pair_order_flag_is_validated():
    assert RewardArguments().unifiedreward_pair_order == "random"
    with pytest.raises(ValueError, match="--unifiedreward_pair_order"):
        RewardArguments(unifiedreward_pair_order="shuffled")


# ---------- against the stand-in server ----------

def test_position_bias_no_longer_orders_rewards_by_index(server):
    """An always-"Image 1" judge: the reference's fixed order gave [1, 2/3, 1/3, 0]; the default random order
    gives each index 0.5 in expectation (60 seeded calls, sd of each mean 0.037), and the Image-1 share logs 1.0."""
    images = [gray(120)] * 4
    fixed = make_client(server.url, "fixed")
    client = make_client(server.url, "random", seed=3)
    try:
        biased = fixed.score(images, ["FIRST a fox"] * 4, [0] * 4)
        results = [client.score(images, ["FIRST a fox"] * 4, [0] * 4) for _ in range(60)]
    finally:
        fixed.close()
        client.close()
    assert biased.values == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert biased.metrics["image1_share"] == 1.0 and biased.metrics["answer_parse_rate"] == 1.0
    means = [statistics.mean(s.values[i] for s in results) for i in range(4)]
    assert means == pytest.approx([0.5] * 4, abs=0.15)  # 4 sd; the fixed order is 0.5 off at both ends
    assert sum(s.values == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0]) for s in results) < 10
    assert all(s.metrics["image1_share"] == 1.0 for s in results)  # the bias is visible in the log instead


def test_both_orders_cancel_a_position_bias_and_log_agreement(server):
    client = make_client(server.url, "both")
    try:
        biased = client.score([gray(10), gray(200), gray(90)], ["FIRST x"] * 3, [0] * 3)
        honest = client.score([gray(10), gray(200), gray(90)], ["a fair judge"] * 3, [0] * 3)
    finally:
        client.close()
    assert biased.values == pytest.approx([0.5, 0.5, 0.5])
    assert biased.metrics["requests"] == 6 and biased.metrics["both_orders_agreement"] == 0.0
    # The brightness judge is order-invariant: ranks 10 < 90 < 200 -> 0, 1, 0.5, and every pair agrees.
    assert honest.values == pytest.approx([0.0, 1.0, 0.5])
    assert honest.metrics["both_orders_agreement"] == 1.0 and honest.metrics["image1_share"] == pytest.approx(0.5)


def test_truncated_reply_is_one_request_named_and_counted(server):
    before = server.stats()["requests"].get("TRUNCATED", 0)
    client = make_client(server.url, "fixed")
    try:
        scores = client.score([gray(10), gray(20), gray(30), gray(40), gray(50)],
                              ["a tree"] * 2 + ["TRUNCATED a house"] * 3, [0, 0, 1, 1, 1])
    finally:
        client.close()
    assert server.stats()["requests"].get("TRUNCATED", 0) - before == 3  # one request per pair: no retries
    assert scores.values[:2] == [0.0, 1.0] and scores.values[2:] == [None, None, None]
    assert all("--unifiedreward_max_tokens" in e and "max_tokens=64" in e for e in scores.errors[2:])
    assert scores.metrics["truncation_rate"] == pytest.approx(3 / 4)  # 3 of the 4 replies were cut

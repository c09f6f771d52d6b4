"""The pointwise ``vlm_judge`` reward (issue 15 item 2): reply parsers, named judges per dataset, and the client
against the stand-in vLLM server (a real process on 127.0.0.1; its judge reads the image's brightness b:
"Score: N/10" with N = 1 + round(9 b), or logprobs with P(yes) = b)."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from deepgen_rl.config import RewardArguments
from deepgen_rl.data.dataset_yaml import load_dataset_config
from deepgen_rl.rewards.http_utils import PermanentError
from deepgen_rl.rewards.protocol import Choice
from deepgen_rl.rewards.registry import REWARD_NAMES, build_rewards, known_reward_names
from deepgen_rl.rewards.vlm_judge import load_judge_specs, parse_score, yes_probability
from tests.reward_servers import fake_server

pytestmark = pytest.mark.timeout(120)

QUESTION = "Caption: 「{prompt}」. Rate 1-10."


def gray(level: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (level, level, level))


def reward_args(url: str, **overrides) -> RewardArguments:
    values = dict(vlm_judge_url=url, vlm_judge_model_name="UnifiedReward", vlm_judge_question=QUESTION,
                  reward_timeout=10.0, reward_max_retries=2, reward_retry_backoff=0.01, reward_health_timeout=5.0)
    return RewardArguments(**{**values, **overrides})


def choice(top: list[tuple[str, float]], token: str = "Yes", content: str = "Yes") -> Choice:
    return Choice.model_validate({"message": {"content": content}, "finish_reason": "length", "logprobs": {"content": [
        {"token": token, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}]}})


@pytest.fixture(scope="module")
def server():
    with fake_server() as srv:
        yield srv


@pytest.mark.parametrize("reply, expected", [
    ("8", 7 / 9), ("Score: 8/10", 7 / 9), ("I give it 3 out of 10.\nFinal: 10", 1.0), ("7.5", 6.5 / 9),
    ("1", 0.0), ("score 6 / 10", 5 / 9),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["no number here", "0", "11", "Score: 12/10", ""])
def test_parse_score_rejects(reply):
    with pytest.raises(ValueError):
        parse_score(reply)


def test_yes_probability_hand_worked():
    # P(yes) = 0.5 + 0.1 (" yes" and "Yes" both read yes), P(no) = 0.2; "maybe" is dropped: 0.6 / 0.8.
    assert yes_probability(choice([("Yes", 0.5), (" yes", 0.1), ("No", 0.2), ("maybe", 0.15)])) == pytest.approx(0.75)
    # The first non-blank token is the answer's position (a leading newline token is skipped).
    two = Choice.model_validate({"message": {"content": "\nNo"}, "logprobs": {"content": [
        {"token": "\n", "logprob": 0.0, "top_logprobs": [{"token": "\n", "logprob": 0.0}]},
        {"token": "No", "logprob": -0.2, "top_logprobs": [{"token": "No", "logprob": math.log(0.9)},
                                                          {"token": "Yes", "logprob": math.log(0.1)}]}]}})
    assert yes_probability(two) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="neither 'yes' nor 'no'"):
        yes_probability(choice([("Maybe", 0.9)]))
    with pytest.raises(PermanentError, match="no token logprobs"):
        yes_probability(Choice.model_validate({"message": {"content": "Yes"}}))


def test_score_and_yes_no_against_the_server(server):
    images = [gray(0), gray(255), gray(51), gray(153)]  # b = 0, 1, 0.2, 0.6
    rewards = build_rewards(["vlm_judge"], reward_args(server.url))
    judge = rewards["vlm_judge"]
    try:
        scores = judge.score(images, ["a cat"] * 4, [0, 0, 1, 1])
    finally:
        judge.close()
    # N = 1 + round(9 b) = 1, 10, 3, 6 -> (N - 1) / 9
    assert scores.values == pytest.approx([0.0, 1.0, 2 / 9, 5 / 9])
    assert scores.metrics == {"answer_parse_rate": 1.0, "truncation_rate": 0.0}
    yes_no = build_rewards(["vlm_judge"], reward_args(server.url, vlm_judge_answer="yes_no",
                                                      vlm_judge_max_tokens=1))["vlm_judge"]
    try:
        scores = yes_no.score(images, ["a cat"] * 4, [0, 0, 1, 1])
    finally:
        yes_no.close()
    assert scores.values == pytest.approx([0.01, 0.99, 0.2, 0.6])  # P(yes) = clip(b, 0.01, 0.99)
    assert server.stats()["requests"]["OK"] >= 8


@pytest.mark.parametrize("keyword, answer, attempts, message", [
    ("TRUNCATED", "score", 1, "raise --vlm_judge_max_tokens"),  # cut: one request, no retry
    ("GARBAGE", "score", 3, "failed after 3 attempts"),          # unreadable: retried, then reported
    ("NOLOGPROBS", "yes_no", 1, "no token logprobs"),                # the server cannot: not retried
])
def test_failures_follow_the_unifiedreward_rules(server, keyword, answer, attempts, message):
    before = server.stats()["requests"].get(keyword, 0)
    judge = build_rewards(["vlm_judge"], reward_args(server.url, vlm_judge_answer=answer))["vlm_judge"]
    try:
        scores = judge.score([gray(100), gray(100)], ["a dog", f"{keyword} a dog"], [0, 1])
    finally:
        judge.close()
    assert scores.values[0] is not None and scores.values[1] is None
    assert message in scores.errors[1]
    assert server.stats()["requests"].get(keyword, 0) - before == attempts
    replies = 1 + attempts
    assert scores.metrics["answer_parse_rate"] == pytest.approx(1 / replies)
    assert scores.metrics["truncation_rate"] == pytest.approx((keyword == "TRUNCATED") / replies)


def test_named_judges_per_dataset(tmp_path, server):
    config = tmp_path / "judges.yaml"
    config.write_text("judges:\n  vlm_judge_yes:\n    answer: yes_no\n    max_tokens: 1\n"
                      "    question: 'Does 「{prompt}」 match? yes or no'\n", encoding="utf-8")
    (tmp_path / "p.txt").write_text("a cat\n", encoding="utf-8")
    (tmp_path / "train.yaml").write_text(
        "datasets:\n  - {name: a, path: p.txt, rewards: [vlm_judge: 1.0]}\n"
        "  - {name: b, path: p.txt, rewards: [vlm_judge_yes: 1.0]}\n", encoding="utf-8")
    args = reward_args(server.url, vlm_judge_config=str(config))
    assert known_reward_names(args) == (*REWARD_NAMES, "vlm_judge_yes") and "vlm_judge" in REWARD_NAMES
    dataset = load_dataset_config(tmp_path / "train.yaml", known_reward_names(args))
    rewards = build_rewards(dataset.reward_names, args)
    try:
        assert rewards["vlm_judge_yes"].spec.question.startswith("Does") and rewards["vlm_judge"].spec.answer == "score"
        assert rewards["vlm_judge_yes"].spec.url == server.url  # unset keys come from the flags
        assert rewards["vlm_judge_yes"].score([gray(51)], ["a cat"], [0]).values == pytest.approx([0.2])
    finally:
        for reward in rewards.values():
            reward.close()


@pytest.mark.parametrize("text, message", [
    ("judges:\n  other: {answer: score}\n", "must start with 'vlm_judge_'"),
    ("judges:\n  vlm_judge_x: {answr: score}\n", "judges.vlm_judge_x.answr: unknown key"),
    ("judges:\n  vlm_judge_x: {question: 'no placeholder'}\n", "must contain '{prompt}'"),
    ("judges:\n  vlm_judge_x: {answer: stars}\n", "answer must be one of score, yes_no"),
    ("judges:\n  vlm_judge_x: {max_tokens: many}\n", "max_tokens must be a positive integer"),
    ("[]\n", "top-level 'judges' mapping"),
])
def test_judge_config_errors_name_the_file_and_key(tmp_path, text, message):
    config = tmp_path / "judges.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_judge_specs(reward_args("http://127.0.0.1:1", vlm_judge_config=str(config)))
    assert str(config) in str(info.value)


def test_flags_are_validated():
    with pytest.raises(ValueError, match="--vlm_judge_question"):
        RewardArguments(vlm_judge_question="Rate this image.")
    with pytest.raises(ValueError, match="--vlm_judge_answer"):
        RewardArguments(vlm_judge_answer="stars")

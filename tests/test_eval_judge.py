"""The judge prompt, the score parser, and the client against a stand-in judge on a real socket."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from deepgen_rl.eval.dataset import BenchPrompt
from deepgen_rl.config import JudgeArguments
from deepgen_rl.eval.judge import UniGenBenchJudge
from deepgen_rl.eval.judge_prompt import JudgeReplyError, parse_judge_scores, render_judge_prompt
from deepgen_rl.rewards.http_utils import RewardServerUnavailable
from tests.servers.fake_judge import (
    ERROR,
    ERROR_ONCE,
    MALFORMED,
    MALFORMED_ONCE,
    NORMAL,
    NOT_JSON,
    SLOW,
    TRUNCATED,
    WRONG_LENGTH,
    FakeJudge,
    encode_verdict,
)

SERVED = "UniGenBench-EvalModel-qwen3vl-32b-v1"
ITEM = BenchPrompt(index=7, prompt="Two {red} pandas under 「a」 tree", primary_category="Art", secondary_category="",
                   test_points=("Style", "Attribute - Quantity", "Made Up Point"),
                   test_point_descriptions=("ink painting", "two pandas", "something"))


# ---- prompt and parser ----

def test_prompt_lists_every_test_point_with_definition_and_description():
    text = render_judge_prompt(ITEM, "en")
    assert "「Two {red} pandas under 「a」 tree」" in text  # braces in prompts survive
    assert "<checkpoint>['Style', 'Attribute - Quantity', 'Made Up Point']</checkpoint>" in text
    assert "Style: the artistic, photographic or design style" in text
    assert "Attribute - Quantity: the exact number of items" in text
    assert "Made Up Point: (no definition)" in text
    for point, description in zip(ITEM.test_points, ITEM.test_point_descriptions):
        assert f"\n{point}: {description}" in text
    assert "<score>" in text and "<analysis>" in text


def test_chinese_prompt():
    item = BenchPrompt(0, "两只熊猫", "", "", ("风格", "属性-数量"), ("水墨画", "两只"))
    text = render_judge_prompt(item, "zh")
    assert "请逐个考点检查所附生成图像是否符合其生成提示词" in text
    assert "<checkpoint>['风格', '属性-数量']</checkpoint>" in text
    assert "\n属性-数量: 物体的准确数量，尤其是三个及以上" in text and "\n属性-数量: 两只" in text


@pytest.mark.parametrize("reply, expected", [
    ("<analysis>['a', 'b', 'c']</analysis><score>[1, 0, 1]</score>", [1, 0, 1]),
    ("<description>\n<analysis>[...]</analysis>\n<score>\n[0,0,1]\n</score></description>", [0, 0, 1]),
    ("<score>['1', '0', '0']</score>", [1, 0, 0]),
    ("<score>[9]</score> then corrected: <score>[1, 1, 0]</score>", [1, 1, 0]),  # the last tag is the answer
])
def test_parse_scores(reply, expected):
    assert parse_judge_scores(reply, 3) == expected


@pytest.mark.parametrize("reply, message", [
    (None, "empty reply"),
    ("The image is nice.", "no <score>"),
    ("<score>[1, 0]</score>", "2 entries for 3 test points"),
    ("<score>[1, 0, 1, 1]</score>", "4 entries for 3 test points"),
    ("<score>[1, 2, 0]</score>", "must be 0 or 1"),
    ("<score>[True, 0, 1]</score>", "must be 0 or 1"),
    ("<score>[1, 0, </score>", "not a list literal"),
    ("<score>{'a': 1}</score>", "not a list"),
    ("<score>__import__('os')</score>", "not a list literal"),
])
def test_unusable_replies(reply, message):
    with pytest.raises(JudgeReplyError, match=message.replace("[", "\\[")):
        parse_judge_scores(reply, 3)


# ---- client against the stand-in judge ----

@pytest.fixture(scope="module")
def fake_judge():
    with FakeJudge(slow_s=5.0) as server:
        yield server


def _settings(url: str, **overrides) -> JudgeArguments:
    values = dict(unigenbench_api_url=url, unigenbench_model_name=SERVED, judge_timeout=5.0, judge_max_retries=2,
                  judge_retry_backoff=0.01, judge_max_concurrency=4, unigenbench_max_tokens=321,
                  judge_health_timeout=5.0)
    values.update(overrides)
    return JudgeArguments(**values)


def _image(scores, behaviour=NORMAL, tag=0) -> Image.Image:
    return Image.new("RGB", (32, 32), encode_verdict(scores, behaviour, tag))


def test_known_scores_and_request_contract(fake_judge):
    with UniGenBenchJudge(_settings(fake_judge.url)) as judge:
        judge.check_ready()
        result = judge.judge("bench", ITEM, 1, _image([1, 0, 1]), "en")
    assert result.scores == (1, 0, 1) and result.error is None and result.attempts == 1
    assert (result.dataset, result.index, result.duplicate) == ("bench", 7, 1)
    assert result.primary_dimensions == ("Style", "Attribute", "Made Up Point")
    last = fake_judge.stats()["last_request"]
    assert last["model"] == SERVED and last["temperature"] == 0.0 and last["max_tokens"] == 321
    assert last["num_images"] == 1 and last["image_prefix"] == "data:image/png;base64,"
    assert last["text"] == render_judge_prompt(ITEM, "en")


@pytest.mark.parametrize("behaviour, attempts", [(MALFORMED_ONCE, 2), (ERROR_ONCE, 2)])
def test_transient_failures_are_retried(fake_judge, behaviour, attempts):
    with UniGenBenchJudge(_settings(fake_judge.url)) as judge:
        result = judge.judge("bench", ITEM, 0, _image([0, 1, 1], behaviour, tag=10 + behaviour), "en")
    assert result.scores == (0, 1, 1) and result.attempts == attempts


@pytest.mark.parametrize("behaviour, message", [
    (MALFORMED, "no <score>"),
    (WRONG_LENGTH, "4 entries for 3 test points"),
    (ERROR, "HTTP 500"),
    (NOT_JSON, "does not match ChatCompletionResponse"),
])
def test_persistent_failures_are_retried_then_reported(fake_judge, behaviour, message):
    before = fake_judge.stats()["counts"].get("chat", 0)
    with UniGenBenchJudge(_settings(fake_judge.url, judge_max_retries=2)) as judge:
        result = judge.judge("bench", ITEM, 0, _image([1, 1, 1], behaviour, tag=20 + behaviour), "en")
    assert result.scores is None and not result.ok
    assert result.attempts == 3 and "failed after 3 attempts" in result.error and message in result.error
    assert fake_judge.stats()["counts"]["chat"] - before == 3  # the server really saw every retry
    assert "bench[7] image 0" in result.error


def test_reply_cut_by_max_tokens_is_reported_without_retrying(fake_judge):
    before = fake_judge.stats()["counts"].get("chat", 0)
    with UniGenBenchJudge(_settings(fake_judge.url, judge_max_retries=2)) as judge:
        result = judge.judge("bench", ITEM, 0, _image([1, 1, 1], TRUNCATED, tag=50), "en")
    assert result.scores is None and result.attempts == 1
    assert "max_tokens=321" in result.error and "finish_reason 'length'" in result.error
    assert fake_judge.stats()["counts"]["chat"] - before == 1  # greedy decoding would cut it the same way again


def test_slow_judge_times_out_and_is_reported(fake_judge):
    with UniGenBenchJudge(_settings(fake_judge.url, judge_timeout=0.3, judge_max_retries=1)) as judge:
        result = judge.judge("bench", ITEM, 0, _image([1, 1, 1], SLOW, tag=40), "en")
    assert result.scores is None and "Timeout" in result.error and result.attempts == 2


def test_deadline_stops_attempts(fake_judge):
    import time

    with UniGenBenchJudge(_settings(fake_judge.url, judge_timeout=30.0, judge_max_retries=5)) as judge:
        result = judge.judge("bench", ITEM, 0, _image([1, 1, 1], SLOW, tag=41), "en", deadline=time.monotonic() + 0.5)
    assert result.scores is None and "deadline" in result.error
    # Bounded by the deadline, not by 6 attempts of 30 s: the request cut at the deadline, then a retry refused
    # before it was sent.
    assert result.attempts == 2


def test_concurrent_submissions():
    with FakeJudge(delay_s=0.3) as slow_server, \
            UniGenBenchJudge(_settings(slow_server.url, judge_max_concurrency=4)) as judge:
        futures = [judge.submit("bench", ITEM, k, _image([k % 2, 1, 0], tag=k), "en") for k in range(8)]
        results = [future.result(timeout=30) for future in futures]
        max_inflight = slow_server.stats()["max_inflight"]
    assert [r.scores for r in results] == [(k % 2, 1, 0) for k in range(8)]
    assert [r.duplicate for r in results] == list(range(8))
    assert 1 < max_inflight <= 4  # requests overlapped, never more than max_concurrency


def test_wrong_served_name_is_a_clear_error_and_not_retried(fake_judge):
    with UniGenBenchJudge(_settings(fake_judge.url, unigenbench_model_name="NotTheJudge")) as judge:
        with pytest.raises(RewardServerUnavailable, match="--served-model-name NotTheJudge"):
            judge.check_ready()
        result = judge.judge("bench", ITEM, 0, _image([1, 1, 1]), "en")
    assert result.scores is None and result.attempts == 1 and "HTTP 404" in result.error


def test_judge_down_names_url_and_launcher():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: connection refused
        with UniGenBenchJudge(_settings(url, judge_health_timeout=0.5, judge_max_retries=1)) as judge:
            with pytest.raises(RewardServerUnavailable) as info:
                judge.check_ready()
            result = judge.judge("bench", ITEM, 0, _image([1, 1, 1]), "en")
    assert url in str(info.value) and "scripts/eval_unigenbench_evalmodel.sh" in str(info.value)
    assert result.scores is None and result.attempts == 2 and "Connect" in result.error

"""Reward clients and local rewards: the OCR client against a stand-in OCR server of ours (real process),
retry plumbing, the registry, ``jpeg_compressibility`` and ``clip_sim`` (a tiny CLIP saved to disk)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageStat

from deepgen_rl.config import RewardArguments
from deepgen_rl.rewards import REWARD_NAMES, build_rewards
from deepgen_rl.rewards.http_utils import (
    PermanentError,
    RetryableError,
    RetryPolicy,
    RewardServerUnavailable,
    call_with_retries,
)
from deepgen_rl.rewards.jpeg import JpegCompressibilityReward
from deepgen_rl.rewards.ocr_client import OcrRewardClient
from tests.reward_servers import fake_server, free_port

pytestmark = pytest.mark.timeout(120)

MAX_RETRIES = 2


def gray(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def brightness(image: Image.Image) -> float:
    return ImageStat.Stat(image.convert("L")).mean[0] / 255.0


@pytest.fixture(scope="module")
def server():
    with fake_server("--slow-seconds", "3") as srv:
        yield srv


def ocr_client(url: str, batch: int = 3, timeout_s: float = 5.0) -> OcrRewardClient:
    return OcrRewardClient(url, RetryPolicy(timeout_s=timeout_s, max_retries=MAX_RETRIES, backoff_s=0.01),
                           max_concurrency=4, request_batch_size=batch, health_timeout_s=1.0)


# ---------- retry plumbing ----------

def test_call_with_retries_counts_attempts_and_stops_on_permanent_errors():
    policy = RetryPolicy(timeout_s=1.0, max_retries=3, backoff_s=0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RetryableError("not yet")
        return "ok"

    outcome = call_with_retries(flaky, policy, "flaky")
    assert (outcome.value, outcome.attempts) == ("ok", 3)

    calls.clear()
    outcome = call_with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(RetryableError("down")), policy, "x")
    assert outcome.value is None and outcome.attempts == 4 == len(calls) and "failed after 4 attempts" in outcome.error

    calls.clear()
    outcome = call_with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(PermanentError("HTTP 400")),
                                policy, "y")
    assert outcome.attempts == 1 == len(calls) and "HTTP 400" in outcome.error


def test_backoff_doubles_and_is_capped():
    policy = RetryPolicy(timeout_s=1.0, max_retries=10, backoff_s=1.0)
    for k in range(8):
        delay = policy.delay(k)
        assert 0.5 * min(2.0 ** k, 30.0) <= delay <= min(2.0 ** k, 30.0)


# ---------- OCR client against the stand-in ----------

def test_ocr_client_batches_requests_and_returns_scores_in_order(server):
    images = [gray(v) for v in (0, 51, 102, 153, 204, 255, 25)]
    before = len(server.stats()["batch_sizes"])
    client = ocr_client(server.url, batch=3)
    try:
        client.check_ready()
        scores = client.score(images, ['"x"'] * 7, list(range(7)))
    finally:
        client.close()
    assert scores.values == pytest.approx([brightness(im) for im in images])
    assert sorted(server.stats()["batch_sizes"][before:]) == [1, 3, 3]
    assert scores.metrics["requests"] == 3


def test_ocr_client_rejected_item_fails_alone(server):
    images = [gray(10), gray(20), gray(30), gray(40)]
    prompts = ['"a"', 'REJECT "b"', '"c"', 'ITEMERR "d"']
    client = ocr_client(server.url, batch=4)
    try:
        scores = client.score(images, prompts, [0, 0, 0, 0])
    finally:
        client.close()
    assert scores.values[0] == pytest.approx(brightness(images[0]))
    assert scores.values[2] == pytest.approx(brightness(images[2]))
    assert scores.values[1] is None and "items[1].image" in scores.errors[1]
    assert scores.values[3] is None and "engine failed" in scores.errors[3]


@pytest.mark.parametrize("fault", ["ERROR500", "GARBAGE", "SLOW"])
def test_ocr_client_faulty_request_is_retried_then_its_items_fail(server, fault):
    images = [gray(10), gray(20), gray(30), gray(40)]
    prompts = ['"a"', '"b"', f'{fault} "c"', '"d"']
    before = server.stats()["requests"].get(fault, 0)
    client = ocr_client(server.url, batch=2, timeout_s=0.5 if fault == "SLOW" else 5.0)
    try:
        scores = client.score(images, prompts, [0, 0, 0, 0])
    finally:
        client.close()
    assert scores.values[:2] == pytest.approx([brightness(images[0]), brightness(images[1])])
    assert scores.values[2:] == [None, None]  # the faulty request held items 2 and 3
    assert all("failed after 3 attempts" in e for e in scores.errors[2:])
    assert server.stats()["requests"].get(fault, 0) - before == MAX_RETRIES + 1


def test_ocr_client_server_down_is_reported_not_hung():
    url = f"http://127.0.0.1:{free_port()}"
    client = ocr_client(url)
    try:
        with pytest.raises(RewardServerUnavailable) as err:
            client.check_ready()
        assert url in str(err.value) and "bash scripts/reward_ocr.sh" in str(err.value)
        scores = client.score([gray(1), gray(2)], ['"a"', '"b"'], [0, 0])
    finally:
        client.close()
    assert scores.values == [None, None] and "ConnectError" in scores.errors[0]


# ---------- registry ----------

def test_clients_are_built_from_the_reward_flags():
    args = RewardArguments(ocr_url="http://ocr:1", unifiedreward_think_url="http://ur:2", reward_timeout=7.0,
                           reward_max_retries=4, reward_retry_backoff=0.25, reward_max_concurrency=9,
                           reward_request_batch_size=5, reward_health_timeout=3.0)
    policy = RetryPolicy(timeout_s=7.0, max_retries=4, backoff_s=0.25)
    rewards = build_rewards(["ocr", "unifiedreward_think"], args, check_ready=False)
    try:
        ocr, unifiedreward = rewards["ocr"], rewards["unifiedreward_think"]
        assert (ocr.url, ocr.policy, ocr.request_batch_size, ocr.health_timeout_s) == ("http://ocr:1", policy, 5, 3.0)
        chat = unifiedreward.chat
        assert (chat.server.url, chat.server.model_name, chat.policy) == ("http://ur:2", "UnifiedReward", policy)
        assert (chat.max_tokens, chat.health_timeout_s, chat.pool._max_workers) == (4096, 3.0, 9)
    finally:
        for reward in rewards.values():
            reward.close()


def settings_for(ocr_url: str = "http://127.0.0.1:1", clip: str = "") -> tuple[RewardArguments, str]:
    """(reward flags, --clip_model_name_or_path) for ``build_rewards(names, *settings_for(...))``."""
    return RewardArguments(ocr_url=ocr_url, unifiedreward_think_url="http://127.0.0.1:1", unifiedreward_max_tokens=64,
                           reward_timeout=1.0, reward_max_retries=0, reward_retry_backoff=0.0,
                           reward_health_timeout=0.5, reward_max_concurrency=2, reward_request_batch_size=2), clip


def test_registry_names_and_unknown_reward():
    assert set(REWARD_NAMES) == {"ocr", "unifiedreward_think", "clip_sim", "jpeg_compressibility", "pickscore",
                                 "hpsv2", "image_reward", "aesthetic", "edit_vlm_judge", "image_similarity",
                                 "vlm_judge", "synthetic_match", "redness", "brightness"}
    with pytest.raises(ValueError, match="unknown reward 'laion_aesthetic'.*jpeg_compressibility"):
        build_rewards(["laion_aesthetic"], *settings_for())


def test_build_rewards_checks_servers_at_start_up():
    port = free_port()
    with pytest.raises(RewardServerUnavailable, match=f"127.0.0.1:{port}.*scripts/reward_ocr.sh"):
        build_rewards(["ocr"], *settings_for(ocr_url=f"http://127.0.0.1:{port}"))


# ---------- jpeg_compressibility ----------

def test_jpeg_compressibility_definition_and_order():
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (64, 48), (120, 30, 200))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))).convert("RGB")
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    reward = build_rewards(["jpeg_compressibility"], *settings_for())["jpeg_compressibility"]
    assert isinstance(reward, JpegCompressibilityReward)
    values = reward.score([flat, gradient, noise], ["", "", ""], [0, 0, 0]).values
    for image, value in zip((flat, gradient, noise), values):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        assert value == pytest.approx(1 - len(buffer.getvalue()) / (64 * 48 * 3))
    assert values[0] > values[1] > values[2]
    assert all(0 < v < 1 for v in values)


# ---------- clip_sim with a tiny CLIP on disk ----------

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):  # a character-level BPE vocabulary: no merges needed
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_sim_is_the_cosine_of_clip_embeddings(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel

    reward = build_rewards(["clip_sim"], *settings_for(clip=str(tiny_clip_dir)))["clip_sim"]
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red cat", "a very long prompt " * 10, "a red cat"]  # the second exceeds 24 positions
    scores = reward.score(images, prompts, [0, 0, 1])
    assert scores.num_failed == 0
    # Independently: CLIPModel.forward returns L2-normalised image/text embeddings; their dot is the cosine.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=24)
    with torch.no_grad():
        out = model(**inputs)
    expected = (out.image_embeds * out.text_embeds).sum(-1)
    assert scores.values == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in scores.values)


def test_clip_batch_that_raises_fails_only_its_own_samples(tiny_clip_dir):
    reward = build_rewards(["clip_sim"], *settings_for(clip=str(tiny_clip_dir)))["clip_sim"]
    reward.batch_size = 2
    real = reward.similarities

    def similarities(images, prompts):  # the second batch (samples 2-3) hits an out-of-memory-like error
        if prompts[0] == "boom":
            raise RuntimeError("out of memory")
        return real(images, prompts)

    reward.similarities = similarities
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green", "white", "black")]
    scores = reward.score(images, ["a", "b", "boom", "c", "d"], [0, 0, 1, 1, 2])
    assert [v is None for v in scores.values] == [False, False, True, True, False]
    assert scores.errors[2] == scores.errors[3] == "CLIP similarity failed: RuntimeError: out of memory"
    assert scores.errors[0] is None and scores.errors[4] is None
    assert scores.values[:2] == pytest.approx(real(images[:2], ["a", "b"]).tolist())


def test_clip_sim_names_a_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match="CLIP_MODEL_NAME_OR_PATH"):
        build_rewards(["clip_sim"], *settings_for(clip=""))
    with pytest.raises(ValueError, match="not a folder"):
        build_rewards(["clip_sim"], *settings_for(clip=str(tmp_path / "nope")))


# ---------- results matched by id, scores strictly typed (issue 30) ----------

REPLY_FAULTS = {
    "REVERSED": "returned 2 of 2 results under another item's id",
    "DROPPED": "returned 1 results for 2 items",
    "NOIDS": "returned results without ids",
    "STRSCORE": "does not match",
    "BOOLSCORE": "does not match",
}


@pytest.mark.parametrize("fault", sorted(REPLY_FAULTS))
def test_a_reply_out_of_order_short_without_ids_or_with_non_number_scores_fails_its_request(server, fault):
    # Items 0-1 in one request (fine), items 2-3 in another whose reply has the fault: that request fails whole.
    images = [gray(10), gray(20), gray(30), gray(200)]  # different brightness: a reordered score would be wrong
    prompts = ['"a"', '"b"', f'{fault} "c"', '"d"']
    client = ocr_client(server.url, batch=2)
    try:
        scores = client.score(images, prompts, [0, 0, 0, 0])
    finally:
        client.close()
    assert scores.values[:2] == pytest.approx([brightness(images[0]), brightness(images[1])])
    assert scores.values[2:] == [None, None], scores.errors
    for error in scores.errors[2:]:
        assert server.url in error and REPLY_FAULTS[fault] in error  # names the server and what was wrong


def test_a_null_score_without_an_error_is_a_failure_not_a_score(server):
    client = ocr_client(server.url, batch=2)
    try:
        scores = client.score([gray(10), gray(20)], ['NULLSCORE "a"', '"b"'], [0, 0])
    finally:
        client.close()
    assert scores.values == [None, None]
    assert all("no score and no error returned" in error for error in scores.errors)


@pytest.mark.parametrize("fault", ["REVERSED", "STRSCORE", "BOOLSCORE"])
def test_the_model_scorer_client_checks_ids_and_score_types_too(server, fault):
    from deepgen_rl.rewards.scorer_clients import SCORER_CLIENTS, ModelScorerClient

    url = server.url + "/scorer"
    client = ModelScorerClient(SCORER_CLIENTS["aesthetic"], url, RetryPolicy(timeout_s=5.0, max_retries=0,
                               backoff_s=0.0), max_concurrency=1, request_batch_size=4, health_timeout_s=1.0)
    try:
        good = client.score([gray(10), gray(200)], ["a", "b"], [0, 0])
        bad = client.score([gray(10), gray(200)], [f"{fault} a", "b"], [0, 0])
    finally:
        client.close()
    assert good.values == pytest.approx([brightness(gray(10)), brightness(gray(200))])
    assert bad.values == [None, None] and all(url in error for error in bad.errors)

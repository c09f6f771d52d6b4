"""The OCR reward: pure scoring functions, and our OCR server run as a real process reading PIL-drawn text."""

from __future__ import annotations

import base64
import random

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFont

from deepgen_rl.rewards.http_utils import RetryPolicy, encode_png_base64
from deepgen_rl.rewards.ocr_client import OcrRewardClient
from deepgen_rl.rewards.ocr_scoring import (
    NoTargetError,
    OcrScoringOptions,
    OcrToken,
    candidate_strings,
    extract_targets,
    levenshtein,
    normalize_text,
    ocr_reward,
)
from tests.reward_servers import ocr_server

pytestmark = pytest.mark.timeout(180)

DEFAULT = OcrScoringOptions()


# ---------- pure scoring ----------

def edit_distance_by_definition(a: str, b: str) -> int:
    """The recursive definition of Levenshtein distance (exponential without the cache; fine for short strings)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@pytest.mark.parametrize("a, b, expected", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("same", "same", 0),
    ("ab", "ba", 2), ("deepgen", "deepgan", 1),
])
def test_levenshtein_hand_worked(a, b, expected):
    assert levenshtein(a, b) == expected == levenshtein(b, a)


def test_levenshtein_matches_the_recursive_definition():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == edit_distance_by_definition(a, b)


def test_extract_targets_takes_every_double_quoted_span():
    prompt = 'A poster titled "INCEPTION" with the tagline "Your mind is the scene" and a lone " quote'
    assert extract_targets(prompt) == ["INCEPTION", "Your mind is the scene"]
    assert extract_targets("no quotes here") == []
    assert extract_targets('empty "" and blank "   " spans') == []


def test_normalize_text_options():
    assert normalize_text(" Hello,  World! ", DEFAULT) == "helloworld"
    assert normalize_text("Hello, World!", OcrScoringOptions(case_sensitive=True)) == "HelloWorld"
    assert normalize_text("Hello, World!", OcrScoringOptions(ignore_punctuation=False)) == "hello,world!"
    assert normalize_text("你好，世界", DEFAULT) == "你好世界"  # other scripts survive punctuation removal


def test_candidates_are_tokens_adjacent_runs_and_the_whole():
    assert candidate_strings(["a", "b", "c"], ngram_max=2) == ["a", "b", "c", "ab", "bc", "abc"]
    assert candidate_strings([], ngram_max=3) == []


def test_ocr_reward_hand_worked():
    tokens = [OcrToken("Hello", 0.9), OcrToken("Wor1d", 0.9)]
    # target "helloworld" (10 chars); best candidate "hellowor1d": 1 edit -> 0.9; with the 1->l fold: exact.
    assert ocr_reward(["Hello World"], tokens, OcrScoringOptions(confusion_fold=False)) == pytest.approx(0.9)
    assert ocr_reward(["Hello World"], tokens, DEFAULT) == pytest.approx(1.0)
    # Two targets weighted by length: "open" (4) read exactly; "24hrs" (5) shares no letter with "open", so
    # d = max(5, 4) = 5 -> 0: (4 * 1 + 5 * 0) / 9.
    assert ocr_reward(["OPEN", "24 HRS"], [OcrToken("OPEN", 0.99)], DEFAULT) == pytest.approx(4 / 9)
    # Low-confidence boxes are dropped with min_confidence.
    assert ocr_reward(["abc"], [OcrToken("abc", 0.2)], OcrScoringOptions(min_confidence=0.5)) == 0.0
    # Nothing read: 0, a real score (the image shows no text), not a failure.
    assert ocr_reward(["abc"], [], DEFAULT) == 0.0
    with pytest.raises(NoTargetError):
        ocr_reward(["!!!"], [OcrToken("abc", 1.0)], DEFAULT)


def test_ocr_reward_is_one_minus_capped_normalised_distance():
    rng = random.Random(1)
    for _ in range(50):
        target = "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 8)))
        read = "".join(rng.choice("abcdef") for _ in range(rng.randint(0, 10)))
        expected = 1 - min(1.0, edit_distance_by_definition(read, target) / len(target)) if read else 0.0
        got = ocr_reward([target], [OcrToken(read, 1.0)] if read else [], OcrScoringOptions(confusion_fold=False))
        assert got == pytest.approx(expected)


# ---------- the server, as a real process ----------

def font(size: int) -> ImageFont.ImageFont:
    import matplotlib

    path = f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf"
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size=size)


def text_image(text: str) -> Image.Image:
    image = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(image).text((30, 220), text, fill="black", font=font(56))
    return image


@pytest.fixture(scope="module")
def server():
    with ocr_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def renderings():
    return [text_image(t) for t in ("Hello DeepGen", "Hello Deep", "Goodbye Moon")]


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/score", timeout=60, **({"json": body} if body is not None else {}), **kwargs)


def test_server_scores_exact_partial_and_wrong_renderings_in_order(server, renderings):
    prompt = 'A shop sign that reads "Hello DeepGen" above the door'
    items = [{"id": f"item-{i}", "image": encode_png_base64(image), "prompt": prompt}
             for i, image in enumerate(renderings)]
    items.append({"id": "item-3", "image": encode_png_base64(renderings[0]), "prompt": "a sign without a quoted target"})
    response = post(server, {"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["id"] for r in results] == ["item-0", "item-1", "item-2", "item-3"]  # echoed, failed item included
    exact, partial, wrong, no_target = results
    assert exact["score"] > partial["score"] > wrong["score"]
    assert exact["score"] >= 0.9 and "Hello" in exact["recognized_text"]
    assert exact["targets"] == ["Hello DeepGen"]
    # one item without a target fails alone; the batch is scored
    assert no_target["score"] is None and "no double-quoted target" in no_target["error"]


def test_server_accepts_explicit_targets(server, renderings):
    response = post(server, {"items": [{"image": encode_png_base64(renderings[1]), "targets": ["Hello Deep"]}]})
    assert response.status_code == 200
    assert response.json()["results"][0]["score"] >= 0.9


def test_malformed_json_gets_400_naming_the_body(server):
    response = post(server, None, content=b'{"items": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["loc"] == "body"
    assert "not valid JSON" in response.json()["detail"]


def test_non_image_gets_400_naming_the_item(server, renderings):
    not_an_image = base64.b64encode(b"this is plain text, not a PNG").decode()
    items = [{"image": encode_png_base64(renderings[0]), "prompt": '"x"'}, {"image": not_an_image, "prompt": '"x"'}]
    response = post(server, {"items": items})
    assert response.status_code == 400
    assert [e["loc"] for e in response.json()["errors"]] == ["items[1].image"]
    assert "items[1].image" in response.json()["detail"]


def test_missing_field_gets_400_naming_it(server):
    response = post(server, {"items": [{"prompt": '"x"'}]})
    assert response.status_code == 400
    assert response.json()["errors"][0]["loc"] == "items[0].image"
    response = post(server, {"itemz": []})
    assert response.status_code == 400
    assert {e["loc"] for e in response.json()["errors"]} == {"items", "itemz"}


def test_server_never_unpickles(server):
    import pickle

    response = post(server, None, content=pickle.dumps({"items": []}), headers={"content-type": "application/octet-stream"})
    assert response.status_code == 400


def test_ocr_client_end_to_end(server, renderings):
    client = OcrRewardClient(server.url, RetryPolicy(timeout_s=60, max_retries=1, backoff_s=0.01),
                             max_concurrency=2, request_batch_size=2, health_timeout_s=10)
    try:
        client.check_ready()
        prompts = ['a sign "Hello DeepGen"'] * 2 + ["no target"]
        scores = client.score([renderings[0], renderings[2], renderings[1]], prompts, [0, 0, 1])
    finally:
        client.close()
    assert scores.values[0] > scores.values[1]
    assert scores.values[2] is None and "no double-quoted target" in scores.errors[2]
    assert scores.metrics["requests"] == 2


def test_ocr_client_scores_explicit_target_texts(server, renderings):
    # An edit's target_text replaces the quoted spans: the instruction quotes nothing, the target decides.
    client = OcrRewardClient(server.url, RetryPolicy(timeout_s=60, max_retries=1, backoff_s=0.01),
                             max_concurrency=1, request_batch_size=3, health_timeout_s=10)
    try:
        scores = client.score([renderings[0]] * 3, ["make the sign read the new slogan"] * 3, [0, 0, 0],
                              targets=["Hello DeepGen", "Goodbye Moon", None])
    finally:
        client.close()
    assert scores.values[0] >= 0.9 and scores.values[1] < 0.5
    assert scores.values[2] is None and scores.errors[2]  # no target text and no quoted span: fails, with a reason

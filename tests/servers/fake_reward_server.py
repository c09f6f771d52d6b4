"""A stand-in reward server for tests: vLLM's OpenAI chat API (UnifiedReward-Think) and our OCR contract.

    python tests/servers/fake_reward_server.py --port 12345 [--served-model-name UnifiedReward]

It is a real HTTP server (uvicorn) so clients are tested over real sockets. Behaviour is chosen by a keyword
in the prompt / caption, so one server covers every case:

* chat (UnifiedReward): the winner is the BRIGHTER image (mean pixel value; ties -> Image 1), replied in the
  model's <think>...</think><answer>Image N is better</answer> format. Keywords: GARBAGE (a reply without an
  answer), ERROR500 (HTTP 500), BADJSON (200 with a non-JSON body), SLOW (answers after --slow-seconds),
  LAG (answers after --lag-seconds), FLAKY (HTTP 500 on the first attempt of each pair, then a real answer),
  FIRST (always "Image 1 is better": a judge with a pure position bias), TRUNCATED (a reply cut inside <think>
  with finish_reason "length", as vLLM stops at max_tokens).
* chat with ONE image (the pointwise vlm_judge): brightness b in [0, 1] decides. Asked for logprobs: the first
  token is "Yes" with top log-probabilities log(p) for "Yes", log(1 - p) for "No" (p = clip(b, 0.01, 0.99)) and
  a stray " maybe"; otherwise the reply is "Score: N/10" with N = 1 + round(9 b). Keywords: TRUNCATED as above,
  NOLOGPROBS (no logprobs in the reply), GARBAGE.
* vLLM sleep mode: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``; each call is logged in order as
  [path, wall-clock ns (orders the calls of two of these servers), the state /is_sleeping answered or null] in
  ``/stats`` ``sleep_log``. ``--sleep-mode``:
  ``on`` (state flips ``--sleep-lag-seconds`` after the call), ``stuck`` (calls accepted, state never changes),
  ``off`` (404, as vLLM without VLLM_SERVER_DEV_MODE).
* OCR /score: score = mean brightness / 255 of the image, each result echoing its item's id. Keywords: ERROR500,
  GARBAGE (JSON not matching the contract), SLOW, REJECT (400 naming that item as our OCR server does), ITEMERR (a
  per-item error), HUGE (a score of 1e30, as a broken server might send). Faults of the whole reply (the
  request-id protocol): REVERSED (results in reverse order, ids and all), DROPPED (the last result left out),
  NOIDS (results without ids, as an old server), STRSCORE / BOOLSCORE / NULLSCORE (every score sent as the JSON
  string "0.5", as true, or as null without an error).
* Model scorer /scorer/score (our ScoreRequest -> ScoreResponse, as ``rewards/servers/scorer_app.py``): the same
  brightness scores and keywords.

``GET /stats`` returns counters: requests per keyword (attempts, retries included, counted on arrival), answered
requests per keyword (counted once the reply is SENT, so a test that sees the count needs no sleep for the reply to
reach its client), the largest number of requests in flight at once, and the OCR batch sizes seen.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image, ImageStat

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deepgen_rl.rewards.protocol import (  # noqa: E402  (the repo root must be importable first)
    ErrorItem,
    ErrorResponse,
    OcrItemResult,
    OcrScoreRequest,
    OcrScoreResponse,
    ScoreItemResult,
    ScoreRequest,
)

KEYWORDS = ("GARBAGE", "ERROR500", "BADJSON", "SLOW", "LAG", "FLAKY", "REJECT", "ITEMERR", "HUGE", "FIRST",
            "TRUNCATED", "NOLOGPROBS", "REVERSED", "DROPPED", "NOIDS", "STRSCORE", "BOOLSCORE", "NULLSCORE")
# A JSON value sent in place of every score (each must fail the reply, never become a score).
BAD_SCORES = {"STRSCORE": "0.5", "BOOLSCORE": True, "NULLSCORE": None}
CAPTION = re.compile(r"「(.*?)」", re.DOTALL)


def keyword_of(text: str) -> str:
    return next((word for word in KEYWORDS if word in text), "OK")


def brightness(data: str) -> float:
    raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)
    with Image.open(io.BytesIO(raw)) as image:
        return sum(ImageStat.Stat(image.convert("L")).mean)


def think_reply(winner: int) -> str:
    loser = 3 - winner
    return (f"<think>\n1. Semantic consistency:\n    Image {winner} (8/10) - matches;\n    Image {loser} (5/10) - weaker\n"
            f"Total score:\nImage {winner}: 8\nImage {loser}: 5\n</think>\n<answer>Image {winner} is better</answer>")


def pointwise_reply(url: str, keyword: str, logprobs: bool) -> dict:
    """The choice of a one-image (vlm_judge) request; see the module docstring."""
    level = brightness(url) / 255.0
    if keyword == "TRUNCATED":
        return {"message": {"role": "assistant", "content": "The image shows"}, "finish_reason": "length"}
    if keyword == "GARBAGE":
        return {"message": {"role": "assistant", "content": "A nice picture."}, "finish_reason": "stop"}
    if not logprobs:
        return {"message": {"role": "assistant", "content": f"Score: {1 + round(9 * level)}/10"},
                "finish_reason": "stop"}
    p = min(max(level, 0.01), 0.99)
    top = [{"token": "Yes", "logprob": math.log(p)}, {"token": "No", "logprob": math.log(1 - p)},
           {"token": " maybe", "logprob": math.log(1e-3)}]
    choice = {"message": {"role": "assistant", "content": "Yes"}, "finish_reason": "length"}
    if keyword != "NOLOGPROBS":
        choice["logprobs"] = {"content": [{"token": "Yes", "logprob": math.log(p), "top_logprobs": top}]}
    return choice


class SleepState:
    """vLLM sleep mode as the endpoints show it: the state flips ``lag_s`` after /sleep or /wake_up."""

    def __init__(self, mode: str, lag_s: float) -> None:
        self.mode, self.lag_s = mode, lag_s
        self.asleep, self.flip_at, self.target = False, 0.0, False
        self.log: list[list] = []

    def call(self, path: str, target: bool) -> None:
        self.log.append([path, time.time_ns(), None])
        if self.mode == "on":
            self.target, self.flip_at = target, time.monotonic() + self.lag_s

    def is_sleeping(self) -> bool:
        if self.mode == "on" and time.monotonic() >= self.flip_at:
            self.asleep = self.target
        return self.asleep


def ocr_results(parsed: OcrScoreRequest, keywords: list[str]) -> list[OcrItemResult]:
    return [OcrItemResult(id=item.id, targets=["x"], error="engine failed on this image") if keyword == "ITEMERR" else
            OcrItemResult(id=item.id, score=1e30, recognized_text="x", targets=["x"]) if keyword == "HUGE" else
            OcrItemResult(id=item.id, score=brightness(item.image) / 255.0, recognized_text="x", targets=["x"])
            for item, keyword in zip(parsed.items, keywords)]


def faulty_reply(results: list[dict], keywords: list[str]) -> list[dict]:
    """The results as a broken (or old) server would send them, for a reply-level fault keyword."""
    if "REVERSED" in keywords:
        return results[::-1]
    if "DROPPED" in keywords:
        return results[:-1]
    if "NOIDS" in keywords:
        return [{k: v for k, v in r.items() if k != "id"} for r in results]
    bad = next((BAD_SCORES[k] for k in keywords if k in BAD_SCORES), "absent")
    if bad != "absent":
        return [{**r, "score": bad, "error": None} for r in results]
    return results


class TrackReplies:
    """ASGI middleware: requests in flight, and each request's ``state.answered`` keywords counted AFTER the last
    byte of its reply was handed to the server (an endpoint only marks what it answers)."""

    def __init__(self, app, in_flight: dict, answered: Counter) -> None:
        self.app, self.in_flight, self.answered = app, in_flight, answered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})

        async def send_then_count(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.answered.update(scope["state"].get("answered", ()))

        self.in_flight["now"] += 1
        self.in_flight["max"] = max(self.in_flight["max"], self.in_flight["now"])
        try:
            await self.app(scope, receive, send_then_count)
        finally:
            self.in_flight["now"] -= 1


def create_app(served_model_name: str, slow_s: float, lag_s: float, sleep: SleepState) -> FastAPI:
    app = FastAPI()
    requests: Counter = Counter()
    answered: Counter = Counter()
    seen_pairs: Counter = Counter()
    batch_sizes: list[int] = []
    in_flight = {"now": 0, "max": 0}
    app.add_middleware(TrackReplies, in_flight=in_flight, answered=answered)

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "fake"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model"}]}

    @app.get("/stats")
    async def stats():
        return {"requests": dict(requests), "answered": dict(answered), "max_in_flight": in_flight["max"],
                "batch_sizes": batch_sizes, "sleep_log": sleep.log}

    @app.post("/sleep")
    async def go_to_sleep(level: int = 1):
        if sleep.mode == "off":
            return PlainTextResponse("Not Found", status_code=404)
        sleep.call(f"/sleep?level={level}", True)
        return PlainTextResponse("", status_code=200)

    @app.post("/wake_up")
    async def wake_up():
        if sleep.mode == "off":
            return PlainTextResponse("Not Found", status_code=404)
        sleep.call("/wake_up", False)
        return PlainTextResponse("", status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping():
        if sleep.mode == "off":
            return PlainTextResponse("Not Found", status_code=404)
        state = sleep.is_sleeping()
        sleep.log.append(["/is_sleeping", time.time_ns(), state])
        return {"is_sleeping": state}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        content = body["messages"][-1]["content"]
        text = next(part["text"] for part in content if part["type"] == "text")
        urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        caption = CAPTION.search(text).group(1)
        keyword = keyword_of(caption)
        requests[keyword] += 1
        if keyword == "ERROR500":
            return PlainTextResponse("internal error", status_code=500)
        if keyword == "BADJSON":
            return PlainTextResponse("this is not json {", status_code=200)
        if keyword == "FLAKY":
            pair = (caption, hash(urls[0]), hash(urls[1]))
            seen_pairs[pair] += 1
            if seen_pairs[pair] == 1:
                return PlainTextResponse("warming up", status_code=503)
        if keyword in ("SLOW", "LAG"):
            await asyncio.sleep(slow_s if keyword == "SLOW" else lag_s)
        request.state.answered = [keyword]
        if len(urls) == 1:
            return {"id": "fake", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, **pointwise_reply(urls[0], keyword, bool(body.get("logprobs")))}]}
        winner = 1 if keyword == "FIRST" or brightness(urls[0]) >= brightness(urls[1]) else 2
        reply = "Both images look nice to me." if keyword == "GARBAGE" else think_reply(winner)
        finish = "stop"
        if keyword == "TRUNCATED":
            reply, finish = reply[:40], "length"
        return {"id": "fake", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish}]}

    @app.post("/score")
    async def score(request: Request):
        parsed = OcrScoreRequest.model_validate_json(await request.body())
        batch_sizes.append(len(parsed.items))
        keywords = [keyword_of(item.prompt or "") for item in parsed.items]
        requests.update(keywords)
        if "ERROR500" in keywords:
            return PlainTextResponse("internal error", status_code=500)
        if "GARBAGE" in keywords:
            return {"unexpected": "shape"}
        if "SLOW" in keywords:
            await asyncio.sleep(slow_s)
        rejected = [ErrorItem(loc=f"items[{i}].image", msg="not a decodable PNG image")
                    for i, keyword in enumerate(keywords) if keyword == "REJECT"]
        if rejected:
            return JSONResponse(status_code=400, content=ErrorResponse(detail="bad image(s)", errors=rejected).model_dump())
        request.state.answered = keywords
        reply = OcrScoreResponse(results=ocr_results(parsed, keywords), engine="fake").model_dump()
        return {**reply, "results": faulty_reply(reply["results"], keywords)}

    @app.post("/scorer/score")
    async def model_score(request: Request):
        parsed = ScoreRequest.model_validate_json(await request.body())
        keywords = [keyword_of(item.prompt) for item in parsed.items]
        requests.update(keywords)
        request.state.answered = keywords
        results = [ScoreItemResult(id=item.id, score=brightness(item.image) / 255.0).model_dump()
                   for item in parsed.items]
        return {"results": faulty_reply(results, keywords), "scorer": "fake"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="UnifiedReward")
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--lag-seconds", type=float, default=0.3)
    parser.add_argument("--sleep-mode", choices=("on", "stuck", "off"), default="on")
    parser.add_argument("--sleep-lag-seconds", type=float, default=0.0)
    args = parser.parse_args()
    import uvicorn

    sleep = SleepState(args.sleep_mode, args.sleep_lag_seconds)
    uvicorn.run(create_app(args.served_model_name, args.slow_seconds, args.lag_seconds, sleep), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

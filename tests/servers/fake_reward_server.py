"""A stand-in reward server for tests: vLLM's OpenAI chat API (UnifiedReward-Think) and our OCR contract.

    python tests/servers/fake_reward_server.py --port 12345 [--served-model-name UnifiedReward]

It is a real HTTP server (uvicorn) so clients are tested over real sockets. Behaviour is chosen by a keyword
in the prompt / caption, so one server covers every case:

* chat (UnifiedReward): the winner is the BRIGHTER image (mean pixel value; ties -> Image 1), replied in the
  model's <think>...</think><answer>Image N is better</answer> format. Keywords: GARBAGE (a reply without an
  answer), ERROR500 (HTTP 500), BADJSON (200 with a non-JSON body), SLOW (answers after --slow-seconds),
  LAG (answers after --lag-seconds), FLAKY (HTTP 500 on the first attempt of each pair, then a real answer).
* OCR /score: score = mean brightness / 255 of the image. Keywords: ERROR500, GARBAGE (JSON not matching the
  contract), SLOW, REJECT (400 naming that item as our OCR server does), ITEMERR (a per-item error), HUGE (a
  score of 1e30, as a broken server might send).

``GET /stats`` returns counters: requests per keyword (attempts, retries included, counted on arrival), answered
requests per keyword (counted once the reply is SENT, so a test that sees the count needs no sleep for the reply to
reach its client), the largest number of requests in flight at once, and the OCR batch sizes seen.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import re
import sys
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
)

KEYWORDS = ("GARBAGE", "ERROR500", "BADJSON", "SLOW", "LAG", "FLAKY", "REJECT", "ITEMERR", "HUGE")
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


def ocr_results(parsed: OcrScoreRequest, keywords: list[str]) -> list[OcrItemResult]:
    return [OcrItemResult(targets=["x"], error="engine failed on this image") if keyword == "ITEMERR" else
            OcrItemResult(score=1e30, recognized_text="x", targets=["x"]) if keyword == "HUGE" else
            OcrItemResult(score=brightness(item.image) / 255.0, recognized_text="x", targets=["x"])
            for item, keyword in zip(parsed.items, keywords)]


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


def create_app(served_model_name: str, slow_s: float, lag_s: float) -> FastAPI:
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
                "batch_sizes": batch_sizes}

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
        reply = "Both images look nice to me." if keyword == "GARBAGE" else \
            think_reply(1 if brightness(urls[0]) >= brightness(urls[1]) else 2)
        request.state.answered = [keyword]
        return {"id": "fake", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

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
        return OcrScoreResponse(results=ocr_results(parsed, keywords), engine="fake").model_dump()

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="UnifiedReward")
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--lag-seconds", type=float, default=0.3)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(args.served_model_name, args.slow_seconds, args.lag_seconds), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""Reward scoring throughput: batched concurrent requests vs one image per request, sequentially.

    python benchmarks/bench_rewards.py                   # stand-in server with a fixed per-request latency
    python benchmarks/bench_rewards.py --server ocr      # our real OCR server (RapidOCR, CPU-bound)

Both sides use the same client code (``OcrRewardClient``), the same images and the same server process, side by
side in one run; only ``request_batch_size`` / ``max_concurrency`` differ. The default stand-in speaks our OCR
contract and answers each request after ``latency + per_image * n`` seconds, like a GPU model server whose
cost is dominated by per-request overhead and that serves concurrent requests in parallel. Prints
``ratio: <batched images/s / sequential images/s>`` (target >= 4, docs/benchmarks.md#performance-yardsticks).
With ``--server ocr`` the work is CPU OCR on this machine's cores, so batching gains little there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI, Request  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from deepgen_rl.rewards.http_utils import RetryPolicy  # noqa: E402
from deepgen_rl.rewards.ocr_client import OcrRewardClient  # noqa: E402
from deepgen_rl.rewards.protocol import OcrItemResult, OcrScoreRequest, OcrScoreResponse  # noqa: E402


def serve_stand_in(port: int, latency_s: float, per_image_s: float) -> None:
    """The stand-in server (runs in its own process)."""
    import uvicorn

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "stand-in"}

    @app.post("/score")
    async def score(request: Request):
        parsed = OcrScoreRequest.model_validate_json(await request.body())
        await asyncio.sleep(latency_s + per_image_s * len(parsed.items))
        results = [OcrItemResult(id=item.id, score=1.0, recognized_text="", targets=["x"]) for item in parsed.items]
        return OcrScoreResponse(results=results, engine="stand-in").model_dump()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def make_images(n: int, size: int) -> tuple[list[Image.Image], list[str]]:
    images, prompts = [], []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).text((size // 8, size // 2), f"SALE {i}", fill=(0, 0, 0))
        images.append(image)
        prompts.append(f'a shop window with a sign "SALE {i}"')
    return images, prompts


def throughput(url: str, images, prompts, batch_size: int, concurrency: int) -> float:
    client = OcrRewardClient(url, RetryPolicy(timeout_s=600.0, max_retries=0, backoff_s=0.0),
                             max_concurrency=concurrency, request_batch_size=batch_size, health_timeout_s=60.0)
    try:
        client.check_ready()
        client.score(images[:2], prompts[:2], [0, 1])  # warm up connections
        started = time.perf_counter()
        scores = client.score(images, prompts, list(range(len(images))))
        seconds = time.perf_counter() - started
    finally:
        client.close()
    if scores.num_failed:  # a benchmark of failing requests measures nothing
        raise SystemExit(f"{scores.num_failed} images failed, e.g.: {next(e for e in scores.errors if e)}")
    return len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=("stand-in", "ocr"), default="stand-in")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="images per request (batched side)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (batched side)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="stand-in: fixed cost per request")
    parser.add_argument("--per-image-ms", type=float, default=2.0, help="stand-in: extra cost per image")
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_port:
        serve_stand_in(args.serve_port, args.latency_ms / 1000, args.per_image_ms / 1000)
        return

    from tests.reward_servers import ServerProcess, free_port, ocr_server

    if args.server == "ocr":
        server = ocr_server()
        described = "our OCR server (RapidOCR on this CPU)"
    else:
        port = free_port()
        server = ServerProcess([sys.executable, __file__, "--serve-port", str(port), "--latency-ms",
                                str(args.latency_ms), "--per-image-ms", str(args.per_image_ms)], port)
        described = f"stand-in server: {args.latency_ms:g} ms/request + {args.per_image_ms:g} ms/image"
    images, prompts = make_images(args.images, args.size)
    with server:
        sequential = throughput(server.url, images, prompts, batch_size=1, concurrency=1)
        batched = throughput(server.url, images, prompts, args.batch_size, args.concurrency)
    print(f"{args.images} images of {args.size}x{args.size}; {described}")
    print(f"sequential (1 image/request, 1 in flight): {sequential:8.1f} images/s")
    print(f"batched ({args.batch_size} images/request, {args.concurrency} in flight): {batched:8.1f} images/s")
    print(f"ratio: {batched / sequential:.2f}")


if __name__ == "__main__":
    main()

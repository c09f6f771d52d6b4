"""The FastAPI app of the model scorers: one or several loaded scorers behind the shared JSON contract.

Each hosted scorer answers ``GET /<name>/health``, ``GET /<name>/stats`` and ``POST /<name>/score``
(``protocol.ScoreRequest`` -> ``protocol.ScoreResponse``); a process hosting ONE scorer also answers at the root
(``/health``, ``/score``), so its URL is just ``http://host:port``. ``GET /health`` at the root lists the hosted
scorers either way.

A request's images go through the model in batches of ``batch_size`` on one worker thread per scorer, requests
first in first out (``ocr_queue.FifoScorer``: a client that left has its queued batches dropped). A batch the model
fails on, or a non-finite score, becomes the ``error`` of those items; the rest of the request is still scored.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Protocol, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from deepgen_rl.rewards.protocol import (
    OCR_HEALTH_PATH,
    OCR_SCORE_PATH,
    OCR_STATS_PATH,
    ErrorResponse,
    HealthResponse,
    OcrStatsResponse,
    ScoreItemResult,
    ScoreRequest,
    ScoreResponse,
)
from deepgen_rl.rewards.servers.core import BadRequest, ServerLimits, parse_request, read_body, results_unless_abandoned
from deepgen_rl.rewards.servers.ocr_queue import FifoScorer

logger = logging.getLogger("deepgen_rl.scorer_server")

Batch = tuple[list[Image.Image], list[str]]  # (images, prompts) of one model forward


class ImageScorer(Protocol):
    """A loaded model: ``score_batch`` returns one float per image; it may raise (the batch then fails)."""

    name: str

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


def score_one_batch(scorer: ImageScorer, batch: Batch) -> list[ScoreItemResult]:
    """Run one model batch; an exception or a non-finite value fails only the items concerned."""
    images, prompts = batch
    try:
        values = scorer.score_batch(images, prompts)
    except Exception as err:  # a batch the model cannot score never takes the server down
        logger.exception("%s failed on a batch of %d image(s)", scorer.name, len(images))
        return [ScoreItemResult(error=f"{scorer.name} failed: {type(err).__name__}: {err}")] * len(images)
    if len(values) != len(images):
        return [ScoreItemResult(error=f"{scorer.name} returned {len(values)} scores for {len(images)} images")] * len(
            images)
    return [ScoreItemResult(score=float(v)) if math.isfinite(v) else
            ScoreItemResult(error=f"{scorer.name} returned a non-finite score ({v})") for v in values]


def _router(scorer: ImageScorer, queue: FifoScorer, limits: ServerLimits, batch_size: int) -> APIRouter:
    router = APIRouter()

    @router.get(OCR_HEALTH_PATH, response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(engine=scorer.name)

    @router.get(OCR_STATS_PATH, response_model=OcrStatsResponse)
    def stats() -> OcrStatsResponse:
        return OcrStatsResponse(**asdict(queue.counters()))

    @router.post(OCR_SCORE_PATH, response_model=ScoreResponse,
                 responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
    async def score(request: Request):
        try:
            body = await read_body(request, limits.max_body_bytes)
            parsed, images = await run_in_threadpool(parse_request, body, ScoreRequest, limits)
        except BadRequest as err:
            return err.json_response()
        except ClientDisconnect:  # the client left during the upload: nothing to score, nobody to answer
            return Response(status_code=499)
        prompts = [item.prompt for item in parsed.items]
        batches = [(images[i:i + batch_size], prompts[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        results = await results_unless_abandoned(request, queue, queue.submit(batches))
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        flat = [r for batch in results for r in batch]
        # Each result echoes its item's id (the client matches by id, never by position).
        return ScoreResponse(results=[r.model_copy(update={"id": item.id}) for r, item in zip(flat, parsed.items)],
                             scorer=scorer.name)

    return router


def create_scorer_app(scorers: Sequence[ImageScorer], batch_size: int, limits: ServerLimits) -> FastAPI:
    """The app around already-loaded scorers (names must differ)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive; got {batch_size}.")
    queues = {s.name: FifoScorer(lambda batch, s=s: score_one_batch(s, batch), images_in=lambda batch: len(batch[0]),
                                 thread_name=f"{s.name}-fifo") for s in scorers}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for queue in queues.values():
            queue.close()

    app = FastAPI(title="DeepGen-RL reward scorers: " + ", ".join(queues), lifespan=lifespan)
    for scorer in scorers:
        app.include_router(_router(scorer, queues[scorer.name], limits, batch_size), prefix=f"/{scorer.name}")
    if len(scorers) == 1:
        app.include_router(_router(scorers[0], queues[scorers[0].name], limits, batch_size))
    else:
        @app.get(OCR_HEALTH_PATH, response_model=HealthResponse)
        def health() -> HealthResponse:
            return HealthResponse(engine=",".join(queues))
    return app

"""OCR reward server: FastAPI + uvicorn, JSON in and out (never pickle).

    python -m deepgen_rl.rewards.servers.ocr [--port PORT]          # or: bash scripts/reward_ocr.sh

``GET /health`` answers once the engine is loaded. ``POST /score`` takes a batch of base64 images with their
prompts (or explicit target texts) and returns, per image, the OCR reward in [0, 1] and the recognised text
(contract: ``deepgen_rl.rewards.protocol``; scoring: ``deepgen_rl.rewards.ocr_scoring``).

A malformed request (bad JSON, a missing or unknown field, a payload that is not an image) gets HTTP 400 whose
``errors`` name every bad item, e.g. ``items[2].image``. In a valid request an image the engine fails on, or a
prompt without a quoted target, gets an ``error`` in its own result; the rest of the batch is still scored.

Under load: requests are scored whole, first in first out (``ocr_queue.FifoScorer``), so the first ones answer in
time instead of all ending with the queue; a request whose client disconnects (its timeout) is dropped from the
queue or stopped after its current image; a body over ``--max-body-mb`` gets HTTP 413 from its Content-Length
before any of it is read (or as soon as a chunked body passes the limit). ``GET /stats`` counts all of this.

Options are flags, each with an environment fallback (read here only): OCR_HOST, OCR_PORT, OCR_ENGINE,
OCR_CASE_SENSITIVE, OCR_IGNORE_PUNCT, OCR_USE_CONFUSION_FOLD, OCR_MIN_CONF, OCR_NGRAM_MAX (the reference's
names), OCR_MAX_BATCH_ITEMS, OCR_MAX_IMAGE_PIXELS, OCR_MAX_BODY_MB.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from deepgen_rl.rewards.ocr_scoring import NoTargetError, OcrScoringOptions, extract_targets, ocr_reward
from deepgen_rl.rewards.protocol import (
    OCR_HEALTH_PATH,
    OCR_SCORE_PATH,
    OCR_STATS_PATH,
    ErrorResponse,
    HealthResponse,
    OcrItem,
    OcrItemResult,
    OcrScoreRequest,
    OcrScoreResponse,
    OcrStatsResponse,
)
from deepgen_rl.rewards.servers.core import (
    BadRequest,
    ServerLimits,
    env_bool,
    env_number,
    parse_request,
    read_body,
    results_unless_abandoned,
)
from deepgen_rl.rewards.servers.ocr_engines import ENGINE_NAMES, OcrEngine, build_engine
from deepgen_rl.rewards.servers.ocr_queue import FifoScorer

logger = logging.getLogger("deepgen_rl.ocr_server")

DEFAULT_HOST = "0.0.0.0"


def score_item(engine: OcrEngine, item: OcrItem, image: Image.Image, options: OcrScoringOptions) -> OcrItemResult:
    """OCR one image and score it; failures become the item's ``error``. The result echoes the item's ``id``."""
    targets = list(item.targets) if item.targets is not None else extract_targets(item.prompt or "")
    if not targets:
        return OcrItemResult(id=item.id, targets=[],
                             error="no double-quoted target text in the prompt (and no 'targets')")
    try:
        tokens = engine.recognize(image)
    except Exception as err:  # one bad image never fails the batch
        logger.exception("OCR engine failed on an image")
        return OcrItemResult(id=item.id, targets=targets, error=f"OCR engine failed: {type(err).__name__}: {err}")
    recognized = " ".join(token.text for token in tokens)
    try:
        score = ocr_reward(targets, tokens, options)
    except NoTargetError as err:
        return OcrItemResult(id=item.id, recognized_text=recognized, targets=targets, error=str(err))
    return OcrItemResult(id=item.id, score=float(score), recognized_text=recognized, targets=targets)


def create_app(engine: OcrEngine, options: OcrScoringOptions, limits: Optional[ServerLimits] = None) -> FastAPI:
    """The FastAPI app around an already-loaded engine."""
    limits = limits or ServerLimits()
    # OCR is CPU-bound: it runs on the scorer's worker thread, the event loop stays free for /health and uploads.
    scorer: FifoScorer = FifoScorer(lambda pair: score_item(engine, pair[0], pair[1], options))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        scorer.close()

    app = FastAPI(title="DeepGen-RL OCR reward server", lifespan=lifespan)

    @app.get(OCR_HEALTH_PATH, response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(engine=engine.name)

    @app.get(OCR_STATS_PATH, response_model=OcrStatsResponse)
    def stats() -> OcrStatsResponse:
        return OcrStatsResponse(**asdict(scorer.counters()))

    @app.post(OCR_SCORE_PATH, response_model=OcrScoreResponse,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
    async def score(request: Request):
        try:
            body = await read_body(request, limits.max_body_bytes, "--max-body-mb / OCR_MAX_BODY_MB")
            parsed, images = await run_in_threadpool(parse_request, body, OcrScoreRequest, limits)
        except BadRequest as err:
            return err.json_response()
        except ClientDisconnect:  # the client left during the upload: nothing to score, nobody to answer
            return Response(status_code=499)
        job = scorer.submit(list(zip(parsed.items, images)))
        results = await results_unless_abandoned(request, scorer, job)
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return OcrScoreResponse(results=results, engine=engine.name)

    return app


def build_arg_parser() -> argparse.ArgumentParser:
    d = OcrScoringOptions()
    limits = ServerLimits()
    p = argparse.ArgumentParser(prog="python -m deepgen_rl.rewards.servers.ocr", description=__doc__.split("\n")[0])
    p.add_argument("--host", default=os.environ.get("OCR_HOST", DEFAULT_HOST), help="bind address ($OCR_HOST)")
    p.add_argument("--port", type=int, default=env_number("OCR_PORT", None, int),
                   help="port ($OCR_PORT; default: the one training's --ocr_url defaults to)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default=os.environ.get("OCR_ENGINE", "auto"),
                   help="auto = paddleocr when installed, else rapidocr ($OCR_ENGINE)")
    p.add_argument("--case-sensitive", action=argparse.BooleanOptionalAction,
                   default=env_bool("OCR_CASE_SENSITIVE", d.case_sensitive), help="($OCR_CASE_SENSITIVE)")
    p.add_argument("--ignore-punct", action=argparse.BooleanOptionalAction,
                   default=env_bool("OCR_IGNORE_PUNCT", d.ignore_punctuation), help="($OCR_IGNORE_PUNCT)")
    p.add_argument("--confusion-fold", action=argparse.BooleanOptionalAction,
                   default=env_bool("OCR_USE_CONFUSION_FOLD", d.confusion_fold), help="($OCR_USE_CONFUSION_FOLD)")
    p.add_argument("--min-conf", type=float, default=env_number("OCR_MIN_CONF", d.min_confidence, float),
                   help="drop text boxes below this engine confidence ($OCR_MIN_CONF)")
    p.add_argument("--ngram-max", type=int, default=env_number("OCR_NGRAM_MAX", d.ngram_max, int),
                   help="longest run of adjacent boxes tried as one candidate ($OCR_NGRAM_MAX)")
    p.add_argument("--max-batch-items", type=int,
                   default=env_number("OCR_MAX_BATCH_ITEMS", limits.max_batch_items, int), help="($OCR_MAX_BATCH_ITEMS)")
    p.add_argument("--max-image-pixels", type=int,
                   default=env_number("OCR_MAX_IMAGE_PIXELS", limits.max_image_pixels, int),
                   help="($OCR_MAX_IMAGE_PIXELS)")
    p.add_argument("--max-body-mb", type=float,
                   default=env_number("OCR_MAX_BODY_MB", limits.max_body_bytes / 2**20, float),
                   help="largest request body in MiB; larger ones get HTTP 413 before being read ($OCR_MAX_BODY_MB)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_arg_parser().parse_args(argv)
    if args.port is None:  # the default port lives in rewards/names.py only (--ocr_url's default reads it too)
        from deepgen_rl.rewards.names import DEFAULT_OCR_PORT

        args.port = DEFAULT_OCR_PORT
    try:
        options = OcrScoringOptions(case_sensitive=args.case_sensitive, ignore_punctuation=args.ignore_punct,
                                    confusion_fold=args.confusion_fold, min_confidence=args.min_conf,
                                    ngram_max=args.ngram_max)
        engine = build_engine(args.engine)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("OCR engine %s loaded; scoring options %s", engine.name, options)
    import uvicorn

    if args.max_body_mb <= 0:
        raise SystemExit(f"error: --max-body-mb (OCR_MAX_BODY_MB) must be > 0; got {args.max_body_mb}.")
    app = create_app(engine, options, ServerLimits(max_batch_items=args.max_batch_items,
                                                   max_image_pixels=args.max_image_pixels,
                                                   max_body_bytes=int(args.max_body_mb * 2**20)))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())

"""What every reward server of ours shares: request limits, reading and validating a JSON body, decoding base64
images, answering 400/413 that name the bad item, and dropping the work of a client that left.

Used by the OCR server (``servers.ocr``) and the model scorers (``servers.scorer_app``): JSON in and out, never
pickle; a request is validated as a whole and a 400 lists every bad item (``items[2].image``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError

from deepgen_rl.rewards.protocol import ErrorItem, ErrorResponse
from deepgen_rl.rewards.servers.ocr_queue import FifoScorer, Job

logger = logging.getLogger("deepgen_rl.reward_server")

M = TypeVar("M", bound=BaseModel)

# Only formats a generator produces; never let PIL guess among its dozens of decoders for untrusted bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ServerLimits:
    max_batch_items: int = 256
    max_image_pixels: int = 4096 * 4096
    # 16 PNGs of 512x512 (the client's default batch) are ~10-20 MB of base64; far beyond that is a mistake or abuse.
    max_body_bytes: int = 64 * 2**20


class BadRequest(Exception):
    def __init__(self, detail: str, errors: list[ErrorItem], status_code: int = 400) -> None:
        super().__init__(detail)
        self.response = ErrorResponse(detail=detail, errors=errors)
        self.status_code = status_code

    def json_response(self) -> JSONResponse:
        # A 413 leaves the body unread: the connection cannot be reused, say so rather than let the client guess.
        headers = {"Connection": "close"} if self.status_code == 413 else None
        return JSONResponse(status_code=self.status_code, content=self.response.model_dump(), headers=headers)


def _too_large(size: str, limit: int, limit_flag: str) -> BadRequest:
    detail = (f"request body of {size} exceeds the server's limit of {limit} bytes ({limit_flag}): "
              "send fewer images per request (the trainer's --reward_request_batch_size) or raise the limit")
    return BadRequest(detail, [ErrorItem(loc="body", msg=detail)], status_code=413)


async def read_body(request: Request, limit: int, limit_flag: str = "--max-body-mb") -> bytes:
    """The request body; 413 from its Content-Length before reading, or once a chunked body passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(f"bad Content-Length header {declared!r}",
                             [ErrorItem(loc="body", msg="bad Content-Length")])
        if int(declared) > limit:
            raise _too_large(f"{int(declared)} bytes", limit, limit_flag)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"more than {limit} bytes (chunked)", limit, limit_flag)
    return bytes(body)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (after the body is read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def results_unless_abandoned(request: Request, scorer: FifoScorer, job: Job) -> Optional[list]:
    """The job's results, or None (job abandoned) when its client disconnects first."""
    work = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work in done and not work.cancelled():
        return work.result()
    scorer.abandon(job)
    logger.info("a client left before its %d item(s) were scored: its request is dropped", len(job.items))
    return None


def parse_request(body: bytes, model: type[M], limits: ServerLimits) -> tuple[M, list[Image.Image]]:
    """Validate a /score body against ``model`` (a request with ``items[].image``) and decode its images;
    raise BadRequest naming every bad item."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest("request body is not valid JSON", [ErrorItem(loc="body", msg=str(err))]) from None
    try:
        request = model.model_validate(payload)
    except ValidationError as err:
        errors = [ErrorItem(loc=format_loc(e["loc"]), msg=e["msg"]) for e in err.errors()]
        raise BadRequest("request does not match the /score contract: " + "; ".join(
            f"{e.loc}: {e.msg}" for e in errors), errors) from None
    items = request.items  # type: ignore[attr-defined]
    if len(items) > limits.max_batch_items:
        raise BadRequest(f"too many items: {len(items)} > {limits.max_batch_items} (split the batch)",
                         [ErrorItem(loc="items", msg=f"at most {limits.max_batch_items} items per request")])
    images, errors = [], []
    for index, item in enumerate(items):
        try:
            images.append(decode_image(item.image, limits.max_image_pixels))
        except ValueError as err:
            errors.append(ErrorItem(loc=f"items[{index}].image", msg=str(err)))
    if errors:
        raise BadRequest("bad image(s): " + "; ".join(f"{e.loc}: {e.msg}" for e in errors), errors)
    return request, images


def format_loc(loc: Sequence) -> str:
    """pydantic's ('items', 2, 'image') -> 'items[2].image'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def decode_image(data: str, max_pixels: int) -> Image.Image:
    """base64 (optionally a data URL) -> RGB PIL image; ValueError saying what is wrong."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64 ({err})") from None
    try:
        with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"image of {image.width}x{image.height} pixels exceeds the {max_pixels}-pixel limit")
            return image.convert("RGB")
    except ValueError:
        raise
    except Exception as err:  # PIL raises several types for undecodable bytes
        raise ValueError(f"not a decodable {'/'.join(ALLOWED_FORMATS)} image ({type(err).__name__}: {err})") from None


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "n", "off"):
        return False
    raise SystemExit(f"error: environment variable {name}={value!r} must be a boolean (1/0, true/false).")


def env_number(name: str, default, kind):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {name}={value!r} must be a {kind.__name__}.") from None

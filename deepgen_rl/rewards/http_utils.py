"""HTTP plumbing shared by the reward clients: timeouts, bounded retries with backoff, health checks, images.

Failure policy (docs/upstream_compatibility.md#failure-policy): transport errors (refused, reset, timed out), 5xx/429
replies and
replies that do not match the contract are retried ``max_retries`` times with exponential backoff; a 4xx
reply is the caller's bug and is not retried. What still fails is returned as an error string, never raised,
so the reward step can exclude and count the sample.
"""

from __future__ import annotations

import base64
import io
import random
import time
from dataclasses import dataclass
from typing import Callable, Generic, Optional, TypeVar

import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Retries wait backoff_s * 2**k (k = 0, 1, ...) scaled by a random factor in [0.5, 1] so that the many
# requests of a batch that failed together (server restart) do not retry in lock-step; never above this cap.
MAX_BACKOFF_S = 30.0
# A connection that cannot be opened in this long will not open: fail fast and retry.
MAX_CONNECT_TIMEOUT_S = 10.0
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RewardServerUnavailable(RuntimeError):
    """A reward server did not answer its health check; the message says how to start it."""


class RetryableError(Exception):
    """A failure worth retrying (server error, malformed reply)."""


class PermanentError(Exception):
    """A failure that retrying cannot fix (the server rejected the request with a 4xx)."""

    def __init__(self, message: str, status_code: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


@dataclass(frozen=True)
class RetryPolicy:
    """timeout_s: per connect/read/write operation; max_retries: extra attempts after the first;
    backoff_s: wait before the first retry (doubles each retry)."""

    timeout_s: float
    max_retries: int
    backoff_s: float

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(f"invalid RetryPolicy {self}: need timeout_s > 0, max_retries >= 0, backoff_s >= 0.")

    def delay(self, retry_index: int) -> float:
        return min(self.backoff_s * (2.0 ** retry_index), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)

    def httpx_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, MAX_CONNECT_TIMEOUT_S))


@dataclass
class CallOutcome(Generic[T]):
    """value, or error (a message) and the last exception after ``attempts`` tries."""

    value: Optional[T]
    error: Optional[str]
    attempts: int
    exception: Optional[BaseException] = None


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str) -> CallOutcome[T]:
    """Run ``fn`` until it succeeds, raises PermanentError, or ``1 + max_retries`` attempts failed."""
    last: Optional[BaseException] = None
    attempts = policy.max_retries + 1
    for attempt in range(attempts):
        try:
            return CallOutcome(value=fn(), error=None, attempts=attempt + 1)
        except PermanentError as err:
            return CallOutcome(value=None, error=f"{what}: {err}", attempts=attempt + 1, exception=err)
        except (RetryableError, httpx.HTTPError) as err:
            last = err
        if attempt + 1 < attempts:
            time.sleep(policy.delay(attempt))
    described = f"{type(last).__name__}: {last}" if str(last) else type(last).__name__
    return CallOutcome(value=None, error=f"{what}: failed after {attempts} attempts; last error: {described}",
                       attempts=attempts, exception=last)


def make_client(policy: RetryPolicy, max_connections: int) -> httpx.Client:
    """A thread-safe connection pool sized for ``max_connections`` concurrent requests."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(timeout=policy.httpx_timeout(), limits=limits)


def join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def post_json(client: httpx.Client, url: str, payload: dict, reply_model: type[M]) -> M:
    """POST ``payload`` and parse the reply into ``reply_model``; raise Retryable/PermanentError on failure."""
    response = client.post(url, json=payload)
    return parse_reply(response, reply_model)


def parse_reply(response: httpx.Response, reply_model: type[M]) -> M:
    status = response.status_code
    if status in RETRYABLE_STATUS or status >= 500:
        raise RetryableError(f"HTTP {status} from {response.request.url}: {_snippet(response.content)}")
    if status >= 400:
        raise PermanentError(f"HTTP {status} from {response.request.url}: {_snippet(response.content)}",
                             status_code=status, body=response.content)
    try:
        return reply_model.model_validate_json(response.content)
    except ValidationError as err:
        raise RetryableError(f"reply from {response.request.url} does not match {reply_model.__name__}: "
                             f"{_snippet(response.content)} ({err.error_count()} validation errors)") from None


def _snippet(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def wait_for_health(url: str, health_path: str, timeout_s: float, service: str, start_hint: str,
                    poll_s: float = 0.5) -> None:
    """Poll ``GET url + health_path`` until it answers 200, else raise RewardServerUnavailable.

    The message names the URL and how to start the server (``start_hint``), e.g.
    "OCR server at http://localhost:<port> is not reachable ...: start it with `bash scripts/reward_ocr.sh`".
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with httpx.Client(timeout=httpx.Timeout(min(timeout_s, MAX_CONNECT_TIMEOUT_S))) as client:
        while True:
            try:
                response = client.get(join_url(url, health_path))
                if response.status_code == 200:
                    return
                last_error = f"GET {health_path} answered HTTP {response.status_code}"
            except httpx.HTTPError as err:
                last_error = f"GET {health_path} failed: {type(err).__name__}: {err}"
            if time.monotonic() + poll_s > deadline:
                break
            time.sleep(poll_s)
    raise RewardServerUnavailable(
        f"{service} at {url} is not reachable ({last_error}; waited {timeout_s:g} s): {start_hint}"
    )


def encode_png_base64(image: Image.Image) -> str:
    """Lossless PNG bytes of ``image`` (RGB), base64 text. Level-1 deflate: 3-5x faster than the default."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` as vLLM's OpenAI API accepts in ``image_url``."""
    return "data:image/png;base64," + encode_png_base64(image)


def require_served_model(client: httpx.Client, url: str, models_path: str, model_name: str, policy: RetryPolicy,
                         service: str, how_to_fix: str) -> None:
    """Raise RewardServerUnavailable unless the vLLM server at ``url`` lists ``model_name`` (--served-model-name)."""
    from deepgen_rl.rewards.protocol import ModelList  # protocol imports nothing from here; keep it one-way

    outcome = call_with_retries(lambda: parse_reply(client.get(join_url(url, models_path)), ModelList), policy,
                                f"GET {models_path}")
    served = [card.id for card in outcome.value.data] if outcome.value else []
    if model_name not in served:
        raise RewardServerUnavailable(
            f"{service} at {url} serves {served or 'no readable model list'}, not {model_name!r}: {how_to_fix}")

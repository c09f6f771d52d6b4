"""Client of our OCR server: the ``ocr`` reward.

The N images are cut into requests of ``request_batch_size`` images, all sent concurrently (at most
``max_concurrency`` in flight); each request is retried on transport errors, 5xx and malformed replies. If the
server rejects a request with 400 naming bad items, those items fail with its message and the rest of that
request is sent once more, so one bad image never fails its neighbours.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image
from pydantic import ValidationError

from deepgen_rl.rewards.base import RewardScores, check_batch
from deepgen_rl.rewards.http_utils import (
    PermanentError,
    RetryableError,
    RetryPolicy,
    call_with_retries,
    encode_png_base64,
    join_url,
    make_client,
    post_json,
    wait_for_health,
)
from deepgen_rl.rewards.protocol import (
    OCR_HEALTH_PATH,
    OCR_SCORE_PATH,
    ErrorResponse,
    OcrItem,
    OcrItemResult,
    OcrScoreRequest,
    OcrScoreResponse,
)

OCR_START_HINT = "start it with `bash scripts/reward_ocr.sh`, or point OCR_URL / --ocr_url at it"


@dataclass
class _ItemResult:
    value: Optional[float]
    error: Optional[str]


class OcrRewardClient:
    """``ocr`` reward: 1 - normalised edit distance between the quoted target text and what OCR reads."""

    name = "ocr"
    score_range = (0.0, 1.0)  # 1 - normalised edit distance

    def __init__(self, url: str, policy: RetryPolicy, max_concurrency: int, request_batch_size: int,
                 health_timeout_s: float) -> None:
        if request_batch_size <= 0 or max_concurrency <= 0:
            raise ValueError("request_batch_size and max_concurrency must be positive.")
        self.url = url
        self.service = f"OCR server at {url}: {OCR_START_HINT}"
        self.policy = policy
        self.request_batch_size = request_batch_size
        self.health_timeout_s = health_timeout_s
        self._client = make_client(policy, max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ocr-reward")

    def check_ready(self) -> None:
        wait_for_health(self.url, OCR_HEALTH_PATH, self.health_timeout_s, "OCR server", OCR_START_HINT)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        chunks = [list(range(start, min(start + self.request_batch_size, n)))
                  for start in range(0, n, self.request_batch_size)]
        futures = [self._pool.submit(self._score_chunk, [images[i] for i in chunk], [prompts[i] for i in chunk])
                   for chunk in chunks]
        values: list[Optional[float]] = [None] * n
        errors: list[Optional[str]] = [None] * n
        for chunk, future in zip(chunks, futures):
            for index, result in zip(chunk, future.result()):
                values[index], errors[index] = result.value, result.error
        return RewardScores(values=values, errors=errors, metrics={"requests": float(len(chunks))})

    def _score_chunk(self, images: list[Image.Image], prompts: list[str]) -> list[_ItemResult]:
        items = [OcrItem(image=encode_png_base64(image), prompt=prompt) for image, prompt in zip(images, prompts)]
        results: dict[int, _ItemResult] = {}
        pending = list(range(len(items)))
        for round_index in range(2):  # a second round only re-sends what a 400 did not name
            outcome = call_with_retries(lambda: self._post([items[i] for i in pending]), self.policy,
                                        f"OCR request to {self.url}")
            if outcome.value is not None:
                for index, item_result in zip(pending, outcome.value.results):
                    results[index] = _from_server(item_result)
                break
            rejected = rejected_items(outcome.exception) if round_index == 0 else {}
            if not rejected:
                results.update({index: _ItemResult(None, outcome.error) for index in pending})
                break
            for position, message in rejected.items():
                results[pending[position]] = _ItemResult(None, f"OCR server rejected the item: {message}")
            pending = [index for position, index in enumerate(pending) if position not in rejected]
            if not pending:
                break
        return [results[index] for index in range(len(items))]

    def _post(self, items: list[OcrItem]) -> OcrScoreResponse:
        reply = post_json(self._client, join_url(self.url, OCR_SCORE_PATH),
                          OcrScoreRequest(items=items).model_dump(exclude_none=True), OcrScoreResponse)
        if len(reply.results) != len(items):
            raise RetryableError(f"OCR server returned {len(reply.results)} results for {len(items)} items")
        return reply

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _from_server(result: OcrItemResult) -> _ItemResult:
    if result.score is not None:
        return _ItemResult(result.score, None)
    return _ItemResult(None, f"OCR server: {result.error or 'no score and no error returned'}")


def rejected_items(error: Optional[BaseException]) -> dict[int, str]:
    """{position: message} of the items a 400 reply names as ``items[i]...`` (empty otherwise)."""
    if not isinstance(error, PermanentError) or error.status_code != 400:
        return {}
    try:
        reply = ErrorResponse.model_validate_json(error.body)
    except ValidationError:
        return {}
    rejected: dict[int, str] = {}
    for item in reply.errors:
        head, _, rest = item.loc.partition("[")
        number = rest.partition("]")[0]
        if head == "items" and number.isdigit():
            rejected[int(number)] = f"{item.loc}: {item.msg}"
    return rejected

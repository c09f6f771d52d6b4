"""The client of our batched scorer servers (OCR, and the model scorers: pickscore, hpsv2, image_reward, aesthetic).

The N images are cut into requests of ``request_batch_size`` images, all sent concurrently (at most
``max_concurrency`` in flight); each request is retried on transport errors, 5xx and malformed replies. If the
server rejects a request with 400 naming bad items, those items fail with its message and the rest of that
request is sent once more, so one bad image never fails its neighbours. Subclasses say what one item and one
result look like (``_request`` / ``_read``).

Every item carries an id (``<batch token>-<sample index>``, unique within the batch and across batches), and a
reply is accepted only when it has one result per item, each with its item's id, in order: a server that reorders,
drops or invents results (or is too old to echo ids) fails the request, naming its URL, rather than having its
scores given to the wrong images. Reply values are strictly typed (protocol.py).
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from PIL import Image
from pydantic import BaseModel, ValidationError

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
from deepgen_rl.rewards.protocol import OCR_HEALTH_PATH, OCR_SCORE_PATH, ErrorResponse


@dataclass
class ItemResult:
    value: Optional[float]
    error: Optional[str]


class HttpScorerClient:
    """A reward computed by one of our JSON scorer servers at ``url`` (``/health``, ``/score``)."""

    name: str
    score_range: tuple[float, float]
    server_label: str  # "OCR server", for messages
    start_hint: str  # how to start the server / point training at it
    response_model: type[BaseModel]

    def __init__(self, url: str, policy: RetryPolicy, max_concurrency: int, request_batch_size: int,
                 health_timeout_s: float) -> None:
        if request_batch_size <= 0 or max_concurrency <= 0:
            raise ValueError("request_batch_size and max_concurrency must be positive.")
        self.url = url
        self.service = f"{self.server_label} at {url}: {self.start_hint}"
        self.policy = policy
        self.request_batch_size = request_batch_size
        self.health_timeout_s = health_timeout_s
        self._client = make_client(policy, max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"{self.name}-reward")

    def _request(self, ids: list[str], images_b64: list[str], prompts: list[str]) -> BaseModel:
        """The /score request body for these items (item i carries ``ids[i]``)."""
        raise NotImplementedError

    def _read(self, result: Any) -> ItemResult:
        """One item's result from the reply."""
        raise NotImplementedError

    def check_ready(self) -> None:
        wait_for_health(self.url, OCR_HEALTH_PATH, self.health_timeout_s, self.server_label, self.start_hint)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        token = uuid.uuid4().hex[:8]  # tells this batch's results from another's (a server mixing up requests)
        ids = [f"{token}-{i}" for i in range(n)]
        chunks = [list(range(start, min(start + self.request_batch_size, n)))
                  for start in range(0, n, self.request_batch_size)]
        futures = [self._pool.submit(self._score_chunk, [ids[i] for i in chunk], [images[i] for i in chunk],
                                     [prompts[i] for i in chunk])
                   for chunk in chunks]
        values: list[Optional[float]] = [None] * n
        errors: list[Optional[str]] = [None] * n
        for chunk, future in zip(chunks, futures):
            for index, result in zip(chunk, future.result()):
                values[index], errors[index] = result.value, result.error
        return RewardScores(values=values, errors=errors, metrics={"requests": float(len(chunks))})

    def _score_chunk(self, ids: list[str], images: list[Image.Image], prompts: list[str]) -> list[ItemResult]:
        encoded = [encode_png_base64(image) for image in images]
        results: dict[int, ItemResult] = {}
        pending = list(range(len(encoded)))
        what = f"{self.name} request to {self.url}"
        for round_index in range(2):  # a second round only re-sends what a 400 did not name
            outcome = call_with_retries(lambda: self._post([ids[i] for i in pending], [encoded[i] for i in pending],
                                                           [prompts[i] for i in pending]),
                                        self.policy, what)
            if outcome.value is not None:
                for index, item_result in zip(pending, outcome.value.results):
                    results[index] = self._read(item_result)
                break
            rejected = rejected_items(outcome.exception) if round_index == 0 else {}
            if not rejected:
                results.update({index: ItemResult(None, outcome.error) for index in pending})
                break
            for position, message in rejected.items():
                results[pending[position]] = ItemResult(None, f"{self.server_label} rejected the item: {message}")
            pending = [index for position, index in enumerate(pending) if position not in rejected]
            if not pending:
                break
        return [results[index] for index in range(len(encoded))]

    def _post(self, ids: list[str], images_b64: list[str], prompts: list[str]):
        reply = post_json(self._client, join_url(self.url, OCR_SCORE_PATH),
                          self._request(ids, images_b64, prompts).model_dump(exclude_none=True), self.response_model)
        mismatch = result_id_mismatch(ids, [result.id for result in reply.results])
        if mismatch:
            raise RetryableError(f"{self.server_label} at {self.url} {mismatch}: results are matched to images by "
                                 "id, so none of this request's scores is used")
        return reply

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def result_id_mismatch(sent: Sequence[str], returned: Sequence[Optional[str]]) -> str:
    """'' when ``returned`` is exactly ``sent`` (one result per item, in order); else what is wrong, for a message."""
    if list(returned) == list(sent):
        return ""
    if len(returned) != len(sent):
        return f"returned {len(returned)} results for {len(sent)} items"
    if all(value is None for value in returned):
        return "returned results without ids (a server that does not echo request ids: update it)"
    wrong = [(position, want, got) for position, (want, got) in enumerate(zip(sent, returned)) if want != got]
    shown = ", ".join(f"result {position} has id {got!r} for item {want!r}" for position, want, got in wrong[:3])
    return f"returned {len(wrong)} of {len(sent)} results under another item's id ({shown})"


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

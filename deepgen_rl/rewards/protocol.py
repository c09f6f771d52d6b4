"""The HTTP contracts of our reward servers, shared by client and server (one source of truth).

OCR server (ours, ``deepgen_rl.rewards.servers.ocr``)::

    GET  /health -> HealthResponse
    GET  /stats  -> OcrStatsResponse                         (queue and drop counters, for operators and tests)
    POST /score  OcrScoreRequest -> OcrScoreResponse         (JSON only; images are base64-encoded PNG/JPEG)
                 400 ErrorResponse naming every bad item     (bad JSON, missing/unknown field, non-image, ...)
                 413 ErrorResponse                           (body over the server's --max-body-mb, unread)

Model scorers (ours, ``deepgen_rl.rewards.servers.serve``: pickscore, hpsv2, image_reward, aesthetic), the same
paths under ``/<scorer>`` (and at the root when the process hosts one scorer)::

    GET  /health -> HealthResponse (engine: the scorer's name)
    GET  /stats  -> OcrStatsResponse (the same queue counters)
    POST /score  ScoreRequest -> ScoreResponse               400 / 413 ErrorResponse as above

A request is validated as a whole (400 lists every bad item, e.g. ``items[3].image``); once valid, one image
that the OCR engine cannot process gets an ``error`` in its own result and never fails the batch.

Results are matched to items by ``id``, never by position: each request item carries an ``id`` (our client always
sends one, unique within its batch) and the result for it echoes that ``id``. The client fails the whole request,
naming the server's URL, when the reply has another number of results or any result's ``id`` is not its item's
(a server that reorders, drops or invents results; a server too old to echo ids). Replies are parsed strictly: a
``score`` is a JSON number or null (null = that item failed, ``error`` says why); ``"0.5"`` or ``true`` make the
reply invalid instead of being coerced into scores.

vLLM's OpenAI-compatible ``/v1/chat/completions`` (UnifiedReward-Think and the UniGenBench judge): we only
model the fields we send and read; unknown reply fields are ignored, a reply without them is a failure.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

OCR_HEALTH_PATH = "/health"
OCR_SCORE_PATH = "/score"
OCR_STATS_PATH = "/stats"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
VLLM_HEALTH_PATH = "/health"
VLLM_MODELS_PATH = "/v1/models"


class _Strict(BaseModel):
    # Unknown fields are errors: a typo such as "imgae" must be named, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class _StrictTypes(BaseModel):
    # A reply's values are taken as typed, never coerced: lax pydantic turns "0.5" and true into scores.
    model_config = ConfigDict(strict=True)


ITEM_ID_HELP = "the client's id of this item, echoed in its result (results are matched by id, not position)"
RESULT_ID_HELP = "the id of the request item this result is for (null when that item had none)"


class OcrItem(_Strict):
    """One image and the text it should show.

    ``targets`` are the texts to find; when omitted they are every double-quoted span of ``prompt``
    (the reference's convention for OCR prompts). At least one of the two is required.
    """

    id: Optional[str] = Field(default=None, description=ITEM_ID_HELP)
    image: str = Field(description="base64 PNG (or JPEG/WebP) bytes; a 'data:image/...;base64,' prefix is allowed")
    prompt: Optional[str] = Field(default=None, description="generation prompt with the target text in double quotes")
    targets: Optional[list[str]] = Field(default=None, description="explicit target texts (override the prompt)")

    @model_validator(mode="after")
    def _has_text(self) -> "OcrItem":
        if self.prompt is None and self.targets is None:
            raise ValueError("needs 'prompt' (targets = its double-quoted spans) or 'targets'")
        return self


class OcrScoreRequest(_Strict):
    items: list[OcrItem] = Field(min_length=1)


class OcrItemResult(_StrictTypes):
    """``score`` in [0, 1] (1 = every target read exactly) or ``None`` with ``error`` set."""

    id: Optional[str] = Field(default=None, description=RESULT_ID_HELP)
    score: Optional[float] = None
    recognized_text: str = ""
    targets: list[str] = Field(default_factory=list)
    error: Optional[str] = None


class OcrScoreResponse(_StrictTypes):
    results: list[OcrItemResult]
    engine: str


class OcrStatsResponse(BaseModel):
    """Totals since the OCR server started; requests are scored whole, first in first out."""

    requests_received: int
    requests_completed: int
    requests_dropped: int = Field(description="abandoned by their client (disconnect) before their last image")
    images_scored: int
    images_dropped: int = Field(description="never read because their request was abandoned")
    queue_depth: int = Field(description="requests waiting or running now")


class ScoreItem(_Strict):
    """One image and the prompt it was generated from (the aesthetic scorer ignores the prompt)."""

    id: Optional[str] = Field(default=None, description=ITEM_ID_HELP)
    image: str = Field(description="base64 PNG (or JPEG/WebP) bytes; a 'data:image/...;base64,' prefix is allowed")
    prompt: str


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1)


class ScoreItemResult(_StrictTypes):
    """``score`` (a finite float; its scale is the scorer's) or ``None`` with ``error`` set."""

    id: Optional[str] = Field(default=None, description=RESULT_ID_HELP)
    score: Optional[float] = None
    error: Optional[str] = None


class ScoreResponse(_StrictTypes):
    results: list[ScoreItemResult]
    scorer: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    engine: str = ""


class ErrorItem(BaseModel):
    loc: str = Field(description="where the problem is, e.g. 'items[3].image' or 'body'")
    msg: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)


# ---- OpenAI-compatible chat completions (the subset vLLM serves and we use) ----
# vLLM's sleep mode (dev-mode endpoints, VLLM_SERVER_DEV_MODE=1): POST /sleep?level=1 frees the GPU (weights to
# host memory, KV cache dropped), POST /wake_up restores it, GET /is_sleeping -> {"is_sleeping": bool}.
VLLM_SLEEP_PATH = "/sleep"
VLLM_WAKE_UP_PATH = "/wake_up"
VLLM_IS_SLEEPING_PATH = "/is_sleeping"


class IsSleepingResponse(BaseModel):
    is_sleeping: bool


class ImageUrl(BaseModel):
    url: str


class ImageContent(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[ImageContent | TextContent] | str


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage]
    temperature: float = 0.0
    max_tokens: int = 4096
    # Token log-probabilities of the reply (the vlm_judge's yes/no answer); left out of the request when None.
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class ReplyMessage(BaseModel):
    content: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """One generated token, its log-probability and the ``top_logprobs`` most likely tokens at its position."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class Choice(BaseModel):
    message: ReplyMessage
    finish_reason: Optional[str] = None  # "stop", or "length" when max_tokens cut the reply
    logprobs: Optional[ChoiceLogprobs] = None  # present when the request asked for logprobs


class ChatCompletionResponse(BaseModel):
    choices: list[Choice] = Field(min_length=1)


class ModelCard(BaseModel):
    id: str


class ModelList(BaseModel):
    data: list[ModelCard]

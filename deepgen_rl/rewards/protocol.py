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


class OcrItem(_Strict):
    """One image and the text it should show.

    ``targets`` are the texts to find; when omitted they are every double-quoted span of ``prompt``
    (the reference's convention for OCR prompts). At least one of the two is required.
    """

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


class OcrItemResult(BaseModel):
    """``score`` in [0, 1] (1 = every target read exactly) or ``None`` with ``error`` set."""

    score: Optional[float] = None
    recognized_text: str = ""
    targets: list[str] = Field(default_factory=list)
    error: Optional[str] = None


class OcrScoreResponse(BaseModel):
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

    image: str = Field(description="base64 PNG (or JPEG/WebP) bytes; a 'data:image/...;base64,' prefix is allowed")
    prompt: str


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1)


class ScoreItemResult(BaseModel):
    """``score`` (a finite float; its scale is the scorer's) or ``None`` with ``error`` set."""

    score: Optional[float] = None
    error: Optional[str] = None


class ScoreResponse(BaseModel):
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


class ReplyMessage(BaseModel):
    content: Optional[str] = None


class Choice(BaseModel):
    message: ReplyMessage
    finish_reason: Optional[str] = None  # "stop", or "length" when max_tokens cut the reply


class ChatCompletionResponse(BaseModel):
    choices: list[Choice] = Field(min_length=1)


class ModelCard(BaseModel):
    id: str


class ModelList(BaseModel):
    data: list[ModelCard]

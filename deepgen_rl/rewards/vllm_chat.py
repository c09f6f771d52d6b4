"""One client of a vLLM server's OpenAI chat API, shared by every VLM judge (UnifiedReward-Think, UniGenBench).

``ask(images, text, parse)`` sends the images (base64 PNG data URLs) and the question in one user message at
temperature 0 (a verdict must not depend on sampling luck), and runs ``parse`` on the reply text. A transport
error, a 5xx or a reply ``parse`` rejects (it raises ``ValueError``) is retried with backoff; what still fails
comes back as an error string, never raised (``parse`` may raise ``PermanentError`` for a reply that asking
again cannot fix). A reply cut by ``max_tokens`` (finish_reason "length") that ``parse`` cannot read is NOT
retried: greedy decoding would cut it at the same place again; the failure names the flag that raises the limit
(``VllmServer.max_tokens_flag``) and ``Answer.truncated`` counts it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar

import httpx
from PIL import Image

from deepgen_rl.rewards.http_utils import (MAX_CONNECT_TIMEOUT_S, PermanentError, RetryableError, RetryPolicy,
                                           call_with_retries, join_url, make_client, parse_reply, png_data_url,
                                           require_served_model, wait_for_health)
from deepgen_rl.rewards.protocol import (CHAT_COMPLETIONS_PATH, VLLM_HEALTH_PATH, VLLM_MODELS_PATH, ChatCompletionRequest,
                                         ChatCompletionResponse, ChatMessage, Choice, ImageContent, ImageUrl,
                                         TextContent)

T = TypeVar("T")
TEMPERATURE = 0.0
MIN_REQUEST_TIMEOUT_S = 0.05  # httpx rejects a zero timeout; below this the deadline has effectively passed


@dataclass(frozen=True)
class VllmServer:
    """Where a served model is and how to start it (named in every readiness error)."""

    url: str
    model_name: str
    service: str  # e.g. "UnifiedReward-Think server"
    start_hint: str  # the script to run / the URL flag to set
    model_flag: str  # the flag that names the served model, e.g. "--unifiedreward_model_name"
    max_tokens_flag: str = "the max_tokens flag"  # e.g. "--unifiedreward_max_tokens", named when a reply is cut


@dataclass
class Answer(Generic[T]):
    """value (None on failure, then ``error`` says why); ``replies``/``parsed``: HTTP-200 replies received and how
    many ``parse`` accepted; ``last_reply``: the text of the last one; ``truncated``: replies cut at max_tokens
    that ``parse`` could not read (0 or 1: such a reply ends the question)."""

    value: Optional[T]
    error: Optional[str]
    attempts: int
    replies: int
    parsed: int
    last_reply: str
    truncated: int = 0


class VllmChatClient:
    """Thread-safe; ``pool`` runs the callers' concurrent work (``max_concurrency`` requests in flight)."""

    def __init__(self, server: VllmServer, policy: RetryPolicy, max_concurrency: int, max_tokens: int,
                 health_timeout_s: float, thread_name: str) -> None:
        self.server, self.policy, self.max_tokens, self.health_timeout_s = server, policy, max_tokens, health_timeout_s
        self._client = make_client(policy, max_concurrency)
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=thread_name)

    def check_ready(self, timeout_s: Optional[float] = None) -> None:
        """Raise RewardServerUnavailable (naming the URL and the launcher) unless the server answers /health and
        serves ``model_name`` (vLLM's --served-model-name)."""
        s = self.server
        wait_for_health(s.url, VLLM_HEALTH_PATH, timeout_s or self.health_timeout_s, s.service, s.start_hint)
        require_served_model(self._client, s.url, VLLM_MODELS_PATH, s.model_name, self.policy, s.service,
                             f"start vLLM with --served-model-name {s.model_name} (the script does) or set "
                             f"{s.model_flag}.")

    def ask(self, images: Sequence[Image.Image | str], text: str, parse: Callable[[str], T], what: str,
            deadline: Optional[float] = None) -> Answer[T]:
        """One question (images: PIL or data URLs, then ``text``) with retries; ``parse`` reads the reply text.
        ``deadline`` (``time.monotonic()`` seconds): no attempt starts after it and no request waits past it.
        Never raises for a failed request."""
        return self.ask_choice(images, text, lambda choice: parse(choice.message.content or ""), what, deadline)

    def ask_choice(self, images: Sequence[Image.Image | str], text: str, parse: Callable[[Choice], T], what: str,
                   deadline: Optional[float] = None, top_logprobs: Optional[int] = None) -> Answer[T]:
        """As :meth:`ask`, but ``parse`` reads the whole reply choice; ``top_logprobs`` > 0 asks the server for the
        token log-probabilities of the reply (the ``top_logprobs`` likeliest tokens at each position)."""
        content = [ImageContent(image_url=ImageUrl(url=i if isinstance(i, str) else png_data_url(i))) for i in images]
        payload = ChatCompletionRequest(
            model=self.server.model_name, temperature=TEMPERATURE, max_tokens=self.max_tokens,
            messages=[ChatMessage(role="user", content=[*content, TextContent(text=text)])],
            logprobs=True if top_logprobs else None, top_logprobs=top_logprobs or None,
        ).model_dump(exclude_none=True)
        replies: list[str] = []
        counts = {"parsed": 0, "truncated": 0}

        def attempt() -> T:
            choice = self._post(payload, deadline).choices[0]
            replies.append(choice.message.content or "")
            try:
                value = parse(choice)
            except ValueError as err:
                if choice.finish_reason == "length":
                    counts["truncated"] += 1
                    raise PermanentError(f"the reply was cut at max_tokens={self.max_tokens} before an answer "
                                         f"(finish_reason 'length'; not retried, greedy decoding would cut it "
                                         f"again): raise {self.server.max_tokens_flag} ({err})") from None
                raise RetryableError(f"unusable reply: {err}") from None
            counts["parsed"] += 1
            return value

        outcome = call_with_retries(attempt, self.policy, what)
        return Answer(outcome.value, outcome.error, outcome.attempts, len(replies), counts["parsed"],
                      replies[-1] if replies else "", counts["truncated"])

    def _post(self, payload: dict, deadline: Optional[float]) -> ChatCompletionResponse:
        timeout = self.policy.timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout < MIN_REQUEST_TIMEOUT_S:
                raise PermanentError("the deadline passed before the server answered")
        response = self._client.post(join_url(self.server.url, CHAT_COMPLETIONS_PATH), json=payload,
                                     timeout=httpx.Timeout(timeout, connect=min(timeout, MAX_CONNECT_TIMEOUT_S)))
        return parse_reply(response, ChatCompletionResponse)

    def close(self) -> None:
        """Stop queued work; running requests end by their own timeout (their results are dropped)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

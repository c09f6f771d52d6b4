"""Client of the UniGenBench judge: a vLLM server speaking the OpenAI ``/v1/chat/completions`` API.

One request per image: the image as a base64 PNG data URL, then the question of :mod:`judge_prompt` listing
the prompt's test points; greedy decoding (temperature 0) so a verdict does not depend on sampling luck.
Requests run concurrently in a thread pool (``max_concurrency`` in flight per rank); each has an explicit
timeout and bounded retries with backoff (``deepgen_rl.rewards.http_utils``). A reply whose score list is
missing, malformed or of the wrong length is retried like a 5xx, and after the last attempt the image is
reported as failed (excluded from the accuracies and counted, never scored).

A ``deadline`` (``time.monotonic()`` seconds) bounds every request: no attempt starts after it and no request
waits past it, so the periodic evaluation can promise the trainer an end time.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import httpx
from PIL import Image

from deepgen_rl.eval.aggregate import ImageJudgement
from deepgen_rl.eval.dataset import BenchPrompt, Language, primary_dimension
from deepgen_rl.eval.judge_prompt import JudgeReplyError, parse_judge_scores, render_judge_prompt
from deepgen_rl.rewards.http_utils import (
    MAX_CONNECT_TIMEOUT_S,
    PermanentError,
    RetryableError,
    RetryPolicy,
    call_with_retries,
    join_url,
    make_client,
    parse_reply,
    png_data_url,
    require_served_model,
    wait_for_health,
)
from deepgen_rl.rewards.protocol import (
    CHAT_COMPLETIONS_PATH,
    VLLM_HEALTH_PATH,
    VLLM_MODELS_PATH,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ImageContent,
    ImageUrl,
    TextContent,
)

UNIGENBENCH_START_HINT = ("start it with `bash scripts/eval_unigenbench_evalmodel.sh` (vLLM), or point "
                          "UNIGENBENCH_API_URL / --unigenbench_api_url at it")
JUDGE_TEMPERATURE = 0.0
MAX_KEPT_REPLY_CHARS = 2000  # of each reply, kept in the per-image CSV for inspection
MIN_REQUEST_TIMEOUT_S = 0.05  # httpx rejects a zero timeout; below this the deadline has effectively passed


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how hard to try (from DataArguments; see config.py for each default)."""

    url: str
    model_name: str
    timeout_s: float
    max_retries: int
    backoff_s: float
    max_concurrency: int
    max_tokens: int
    health_timeout_s: float

    @classmethod
    def from_data_args(cls, data_args) -> "JudgeSettings":
        return cls(url=data_args.unigenbench_api_url, model_name=data_args.unigenbench_model_name,
                   timeout_s=data_args.reward_timeout, max_retries=data_args.reward_max_retries,
                   backoff_s=data_args.reward_retry_backoff, max_concurrency=data_args.reward_max_concurrency,
                   max_tokens=data_args.unigenbench_max_tokens, health_timeout_s=data_args.reward_health_timeout)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s)


def failed_judgement(dataset: str, item: BenchPrompt, duplicate: int, language: Language, error: str,
                     attempts: int = 0, reply: str = "") -> ImageJudgement:
    """The record of an image that could not be judged (or not even generated)."""
    return ImageJudgement(
        dataset=dataset, index=item.index, duplicate=duplicate, test_points=item.test_points,
        primary_dimensions=tuple(primary_dimension(p, language) for p in item.test_points),
        scores=None, error=error, attempts=attempts, reply=reply)


class UniGenBenchJudge:
    """Thread-safe judge client; ``submit`` returns a future per image, ``judge`` waits for one."""

    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings
        self.policy = settings.retry_policy()
        self._client = make_client(self.policy, settings.max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="unigenbench")

    def check_ready(self, timeout_s: Optional[float] = None) -> None:
        """Raise RewardServerUnavailable (naming the URL and the launcher) unless the judge is up and serves
        ``model_name`` (vLLM's --served-model-name)."""
        url = self.settings.url
        wait_for_health(url, VLLM_HEALTH_PATH, timeout_s or self.settings.health_timeout_s, "UniGenBench judge",
                        UNIGENBENCH_START_HINT)
        require_served_model(self._client, url, VLLM_MODELS_PATH, self.settings.model_name, self.policy,
                             "UniGenBench judge",
                             f"start vLLM with --served-model-name {self.settings.model_name} (the script does) or "
                             "set UNIGENBENCH_MODEL_NAME / --unigenbench_model_name.")

    def submit(self, dataset: str, item: BenchPrompt, duplicate: int, image: Image.Image, language: Language,
               deadline: Optional[float] = None) -> "Future[ImageJudgement]":
        return self._pool.submit(self.judge, dataset, item, duplicate, image, language, deadline)

    def judge(self, dataset: str, item: BenchPrompt, duplicate: int, image: Image.Image, language: Language,
              deadline: Optional[float] = None) -> ImageJudgement:
        """Ask the judge about one image; never raises for a failed request (the record carries the error)."""
        try:
            payload = self._request(item, image, language)
        except Exception as err:  # an unencodable image must not take the evaluation down
            return failed_judgement(dataset, item, duplicate, language, f"cannot build the request: {err}")
        replies: list[str] = []

        def attempt() -> list[int]:
            timeout = self.settings.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout < MIN_REQUEST_TIMEOUT_S:
                    raise PermanentError("evaluation deadline (--eval_timeout) passed before the judge answered")
            response = self._client.post(join_url(self.settings.url, CHAT_COMPLETIONS_PATH), json=payload,
                                         timeout=httpx.Timeout(timeout, connect=min(timeout, MAX_CONNECT_TIMEOUT_S)))
            content = parse_reply(response, ChatCompletionResponse).choices[0].message.content or ""
            replies.append(content)
            try:
                return parse_judge_scores(content, len(item.test_points))
            except JudgeReplyError as err:
                raise RetryableError(f"unusable judge reply: {err}") from None

        what = f"UniGenBench judge on {dataset}[{item.index}] image {duplicate}"
        outcome = call_with_retries(attempt, self.policy, what)
        reply = replies[-1][:MAX_KEPT_REPLY_CHARS] if replies else ""
        if outcome.value is None:
            return failed_judgement(dataset, item, duplicate, language, str(outcome.error), outcome.attempts, reply)
        return ImageJudgement(
            dataset=dataset, index=item.index, duplicate=duplicate, test_points=item.test_points,
            primary_dimensions=tuple(primary_dimension(p, language) for p in item.test_points),
            scores=tuple(outcome.value), error=None, attempts=outcome.attempts, reply=reply)

    def _request(self, item: BenchPrompt, image: Image.Image, language: Language) -> dict:
        return ChatCompletionRequest(
            model=self.settings.model_name,
            messages=[ChatMessage(role="user", content=[
                ImageContent(image_url=ImageUrl(url=png_data_url(image))),
                TextContent(text=render_judge_prompt(item, language)),
            ])],
            temperature=JUDGE_TEMPERATURE,
            max_tokens=self.settings.max_tokens,
        ).model_dump()

    def close(self) -> None:
        """Stop queued requests; running ones end by their own timeout (their results are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> "UniGenBenchJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

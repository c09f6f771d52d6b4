"""Client of the UniGenBench judge: a vLLM server speaking the OpenAI ``/v1/chat/completions`` API.

One request per image: the image as a base64 PNG data URL, then the question of :mod:`judge_prompt` listing
the prompt's test points; greedy decoding (temperature 0) so a verdict does not depend on sampling luck.
Requests go concurrently through the shared vLLM chat client (``rewards/vllm_chat.py``: timeouts, bounded retries);
a reply whose score list is missing, malformed or of the wrong length is retried like a 5xx, then the image is
reported as failed (excluded from the accuracies and counted, never scored).

A ``deadline`` (``time.monotonic()`` seconds) bounds every request: no attempt starts after it and no request
waits past it, so the periodic evaluation can promise the trainer an end time.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace
from typing import Optional

from PIL import Image

from deepgen_rl.config import JudgeArguments
from deepgen_rl.eval.aggregate import ImageJudgement
from deepgen_rl.eval.dataset import BenchPrompt, Language, primary_dimension
from deepgen_rl.eval.judge_prompt import parse_judge_scores, render_judge_prompt
from deepgen_rl.rewards.http_utils import RetryPolicy, png_data_url
from deepgen_rl.rewards.vllm_chat import VllmChatClient, VllmServer

UNIGENBENCH_START_HINT = ("start it with `bash scripts/eval_unigenbench_evalmodel.sh` (vLLM), or point "
                          "UNIGENBENCH_API_URL / --unigenbench_api_url at it")
MAX_KEPT_REPLY_CHARS = 2000  # of each reply, kept in the per-image CSV for inspection


def failed_judgement(dataset: str, item: BenchPrompt, duplicate: int, language: Language, error: str,
                     attempts: int = 0, reply: str = "") -> ImageJudgement:
    """The record of an image that could not be judged (or not even generated)."""
    return ImageJudgement(
        dataset=dataset, index=item.index, duplicate=duplicate, test_points=item.test_points,
        primary_dimensions=tuple(primary_dimension(p, language) for p in item.test_points),
        scores=None, error=error, attempts=attempts, reply=reply)


class UniGenBenchJudge:
    """Thread-safe judge client; ``submit`` returns a future per image, ``judge`` waits for one."""

    def __init__(self, args: JudgeArguments) -> None:
        self.args = args
        server = VllmServer(args.unigenbench_api_url, args.unigenbench_model_name, "UniGenBench judge",
                            UNIGENBENCH_START_HINT, "UNIGENBENCH_MODEL_NAME / --unigenbench_model_name",
                            "--unigenbench_max_tokens")
        policy = RetryPolicy(args.judge_timeout, args.judge_max_retries, args.judge_retry_backoff)
        self.chat = VllmChatClient(server, policy, args.judge_max_concurrency, args.unigenbench_max_tokens,
                                   args.judge_health_timeout, thread_name="unigenbench")

    def check_ready(self, timeout_s: Optional[float] = None) -> None:
        """Raise RewardServerUnavailable (naming the URL and the launcher) unless the judge is up and serves
        ``model_name`` (vLLM's --served-model-name)."""
        self.chat.check_ready(timeout_s)

    def submit(self, dataset: str, item: BenchPrompt, duplicate: int, image: Image.Image, language: Language,
               deadline: Optional[float] = None) -> "Future[ImageJudgement]":
        return self.chat.pool.submit(self.judge, dataset, item, duplicate, image, language, deadline)

    def judge(self, dataset: str, item: BenchPrompt, duplicate: int, image: Image.Image, language: Language,
              deadline: Optional[float] = None) -> ImageJudgement:
        """Ask the judge about one image; never raises for a failed request (the record carries the error)."""
        try:
            image_url, question = png_data_url(image), render_judge_prompt(item, language)
        except Exception as err:  # an unencodable image must not take the evaluation down
            return failed_judgement(dataset, item, duplicate, language, f"cannot build the request: {err}")
        answer = self.chat.ask([image_url], question, lambda reply: parse_judge_scores(reply, len(item.test_points)),
                               f"UniGenBench judge on {dataset}[{item.index}] image {duplicate}", deadline)
        record = failed_judgement(dataset, item, duplicate, language, str(answer.error), answer.attempts,
                                  answer.last_reply[:MAX_KEPT_REPLY_CHARS])
        return record if answer.value is None else replace(record, scores=tuple(answer.value), error=None)

    def close(self) -> None:
        """Stop queued requests; running ones end by their own timeout (their results are dropped)."""
        self.chat.close()

    def __enter__(self) -> "UniGenBenchJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The reward servers of training, the UniGenBench judge of evaluation and how much an evaluation covers:
``RewardArguments``, ``JudgeArguments`` and ``EvalArguments`` (argument groups of
:func:`deepgen_rl.config.parse_args`). Server URLs default to the environment variables the guide names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rewards.names import DEFAULT_OCR_PORT  # the OCR server's own default too (rewards/servers/ocr.py)
from .flag_checks import _check_client_flags, _check_positive, _check_urls, _env_field
from .judge_flags import JudgeRewardFlags, SleepSwitchFlags
from .scorer_flags import SCORER_URL_FLAGS, ScorerUrlArguments

DEFAULT_UNIFIEDREWARD_PORT = 18087
DEFAULT_UNIGENBENCH_PORT = 8000
DEFAULT_EDIT_JUDGE_PORT = 18089


@dataclass
class RewardArguments(JudgeRewardFlags, ScorerUrlArguments):
    """The reward servers of training and how hard to try (one request: a batch of images, or one image pair)."""

    ocr_url: str = _env_field("OCR_URL", f"http://localhost:{DEFAULT_OCR_PORT}", "OCR reward server.")
    unifiedreward_think_url: str = _env_field(
        "UNIFIEDREWARD_THINK_URL", f"http://localhost:{DEFAULT_UNIFIEDREWARD_PORT}",
        "vLLM server (OpenAI API) of UnifiedReward-Think.",
    )
    unifiedreward_model_name: str = field(
        default="UnifiedReward", metadata={"help": "Served model name of UnifiedReward-Think on its vLLM server."}
    )
    reward_timeout: float = field(default=300.0, metadata={"help": "Seconds before one reward request is abandoned."})
    reward_max_retries: int = field(default=3, metadata={"help": "Retries of a failed reward request (then reported)."})
    reward_max_concurrency: int = field(default=64, metadata={"help": "Reward requests in flight at once per rank."})
    reward_request_batch_size: int = field(default=16, metadata={
        "help": "Images per request to batched servers (OCR, pickscore, hpsv2, image_reward, aesthetic)."})
    reward_retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry of a failed reward request; doubles per retry, capped at 30 s."})
    reward_health_timeout: float = field(default=30.0, metadata={
        "help": "Seconds the trainer waits at start-up for each reward server's /health before failing with how to "
                "start it (the launch preflight waits --server_wait instead)."})
    server_wait: float = field(default=900.0, metadata={
        "help": "Seconds the launch preflight (scripts/train.sh) waits, in all, for every reward server and the "
                "judge to answer, all at once, after the local checks passed. The default covers a 32B vLLM model "
                "loading (several minutes)."})
    unifiedreward_max_tokens: int = field(
        default=4096, metadata={"help": "max_tokens of one UnifiedReward-Think reply (its <think> reasoning is long)."}
    )
    # The edit_vlm_judge reward (edit datasets): rewards/edit_judge.py.
    edit_judge_url: str = _env_field("EDIT_JUDGE_URL", f"http://localhost:{DEFAULT_EDIT_JUDGE_PORT}",
                                     "vLLM server (OpenAI API) of the image-editing judge (edit_vlm_judge reward).")
    edit_judge_model_name: str = field(
        default="EditJudge", metadata={"help": "Served model name of the edit judge on its vLLM server."})
    edit_judge_max_tokens: int = field(
        default=2048, metadata={"help": "max_tokens of one edit judge reply (reasoning, then <score>X</score>)."})

    def __post_init__(self) -> None:
        _check_client_flags("reward", self)
        if self.server_wait <= 0:
            raise ValueError(f"--server_wait must be > 0 seconds; got {self.server_wait}.")
        for flag in ("reward_request_batch_size", "unifiedreward_max_tokens", "edit_judge_max_tokens"):
            _check_positive(flag, getattr(self, flag))
        _check_urls(self, "ocr_url", "unifiedreward_think_url", "edit_judge_url", *SCORER_URL_FLAGS)
        self.check_judge_flags()


@dataclass
class JudgeArguments:
    """The UniGenBench judge of evaluation (a vLLM server; one request per image) and how hard to try."""

    unigenbench_api_url: str = _env_field(
        "UNIGENBENCH_API_URL", f"http://localhost:{DEFAULT_UNIGENBENCH_PORT}",
        "vLLM server (OpenAI API) of the UniGenBench judge.",
    )
    unigenbench_model_name: str = _env_field(
        "UNIGENBENCH_MODEL_NAME", "UniGenBench-EvalModel-qwen3vl-32b-v1", "Served model name of the UniGenBench judge."
    )
    unigenbench_max_tokens: int = field(
        default=4096, metadata={"help": "max_tokens of one UniGenBench judge reply (per-test-point analysis, then scores)."}
    )
    judge_timeout: float = field(default=300.0, metadata={"help": "Seconds before one judge request is abandoned."})
    judge_max_retries: int = field(default=3, metadata={"help": "Retries of a failed judge request (then reported)."})
    judge_max_concurrency: int = field(default=64, metadata={"help": "Judge requests in flight at once per rank."})
    judge_retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry of a failed judge request; doubles per retry, capped at 30 s."})
    judge_health_timeout: float = field(default=30.0, metadata={
        "help": "Seconds to wait for the judge's /health (at start-up and before each evaluation)."})

    def __post_init__(self) -> None:
        _check_client_flags("judge", self)
        _check_positive("unigenbench_max_tokens", self.unigenbench_max_tokens)
        _check_urls(self, "unigenbench_api_url")


@dataclass
class EvalArguments(SleepSwitchFlags):
    """UniGenBench evaluation (deepgen_rl/eval/): prompts covered, sample images kept, time allowed."""

    eval_timeout: float = field(
        default=3600.0,
        metadata={"help": "Seconds one periodic evaluation may take before ranks give up waiting (0: no limit)."},
    )
    eval_max_prompts: int = field(
        default=0,
        metadata={"help": "Evaluate only the first N prompts of each eval dataset (0: all of them, as the reference)."},
    )
    eval_num_sample_images: int = field(
        default=8,
        metadata={"help": "Generated eval images saved as PNG per dataset and evaluation (rank 0's first ones)."},
    )

    def __post_init__(self) -> None:
        for flag in ("eval_timeout", "eval_max_prompts", "eval_num_sample_images"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        self.check_switch_flags()

"""Flags of the VLM judges (issue 15): pairwise order of UnifiedReward-Think, the pointwise ``vlm_judge`` reward,
and vLLM sleep switching around evaluation. Mixins of ``config.RewardArguments`` / ``config.EvalArguments`` (their
defaults live here, once; ``config.py`` only inherits them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..rewards.names import PAIR_ORDERS, VLM_ANSWER_FORMATS, PairOrder, VlmAnswerFormat  # noqa: F401 (re-exported)

DEFAULT_VLM_JUDGE_PORT = 18088
DEFAULT_VLM_JUDGE_QUESTION = (
    "You are a strict judge of generated images. The image was generated from this caption: 「{prompt}」. "
    "Rate how well the image follows the caption and how good it looks, on a scale from 1 (worst) to 10 (best). "
    "Answer with the score only, as a number.")


@dataclass
class JudgeRewardFlags:
    """UnifiedReward-Think's pair order and the ``vlm_judge`` reward (a pointwise OpenAI-compatible VLM judge)."""

    unifiedreward_pair_order: PairOrder = field(
        default="random",
        metadata={"help": "Which image of a pair UnifiedReward-Think sees first: 'random' (each pair's order drawn "
                  "per reward call from --unifiedreward_order_seed, the call count and the rank; a judge's position "
                  "bias then averages out), 'both' (judge both orders and average: twice the requests, logs the "
                  "agreement rate) or 'fixed' (lower sample index first, as the reference; biased)."},
    )
    unifiedreward_order_seed: int = field(
        default=0, metadata={"help": "Seed of the random pair orders of --unifiedreward_pair_order random."}
    )
    vlm_judge_url: str = field(
        default_factory=lambda: os.environ.get("VLM_JUDGE_URL", f"http://localhost:{DEFAULT_VLM_JUDGE_PORT}"),
        metadata={"help": "vLLM server (OpenAI API) of the vlm_judge reward. Default: $VLM_JUDGE_URL, else "
                  f"http://localhost:{DEFAULT_VLM_JUDGE_PORT}."},
    )
    vlm_judge_model_name: str = field(
        default_factory=lambda: os.environ.get("VLM_JUDGE_MODEL_NAME", "VlmJudge"),
        metadata={"help": "Served model name of the vlm_judge server. Default: $VLM_JUDGE_MODEL_NAME, else VlmJudge."},
    )
    vlm_judge_question: str = field(
        default=DEFAULT_VLM_JUDGE_QUESTION,
        metadata={"help": "Question sent with each image; '{prompt}' is replaced by the generation prompt."},
    )
    vlm_judge_answer: VlmAnswerFormat = field(
        default="score",
        metadata={"help": "How the reply is read: 'score' (its last number, 1-10, optionally written N/10; reward "
                  "(N - 1) / 9) or 'yes_no' (the first answer token's log-probabilities; reward P(yes) / (P(yes) + "
                  "P(no)); the server must return logprobs)."},
    )
    vlm_judge_max_tokens: int = field(
        default=64, metadata={"help": "max_tokens of one vlm_judge reply (1 is enough for yes_no)."}
    )
    vlm_judge_top_logprobs: int = field(
        default=20, metadata={"help": "Top log-probabilities asked per token for --vlm_judge_answer yes_no."}
    )
    vlm_judge_config: str = field(
        default="",
        metadata={"help": "YAML of named judges for per-dataset judging: {judges: {vlm_judge_<name>: {question, "
                  "answer, url, model_name, max_tokens}}}; each name is a reward usable in the dataset YAML, unset "
                  "keys come from the --vlm_judge_* flags. Empty: only 'vlm_judge' (the flags' judge)."},
    )

    def check_judge_flags(self) -> None:
        if self.unifiedreward_pair_order not in PAIR_ORDERS:
            raise ValueError(f"--unifiedreward_pair_order must be one of {', '.join(PAIR_ORDERS)}; "
                             f"got {self.unifiedreward_pair_order!r}.")
        if self.vlm_judge_answer not in VLM_ANSWER_FORMATS:
            raise ValueError(f"--vlm_judge_answer must be one of {', '.join(VLM_ANSWER_FORMATS)}; "
                             f"got {self.vlm_judge_answer!r}.")
        if "{prompt}" not in self.vlm_judge_question:
            raise ValueError("--vlm_judge_question must contain '{prompt}' where the generation prompt goes.")
        for flag in ("vlm_judge_max_tokens", "vlm_judge_top_logprobs"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag} must be a positive integer; got {getattr(self, flag)}.")
        if not self.vlm_judge_url.startswith(("http://", "https://")):
            raise ValueError(f"--vlm_judge_url must be an http(s):// URL; got {self.vlm_judge_url!r}.")


@dataclass
class SleepSwitchFlags:
    """vLLM sleep mode around the periodic evaluation, for a reward model and a judge that share GPUs."""

    vllm_sleep_switching: bool = field(
        default=False,
        metadata={"help": "Training only: around each periodic evaluation put the vLLM reward servers of this run "
                  "(unifiedreward_think, vlm_judge*) to sleep and wake the UniGenBench judge, then the reverse "
                  "(the judge is put to sleep at start-up). Needs both servers started by our launchers (sleep "
                  "mode, dev-mode endpoints) on hosts this trainer reaches. Off: nothing is switched."},
    )
    vllm_switch_timeout: float = field(
        default=600.0,
        metadata={"help": "Seconds one sleep or wake-up may take (checked on /is_sleeping) before the switch fails "
                  "naming the server's URL."},
    )

    def check_switch_flags(self) -> None:
        if self.vllm_switch_timeout <= 0:
            raise ValueError(f"--vllm_switch_timeout must be > 0; got {self.vllm_switch_timeout}.")

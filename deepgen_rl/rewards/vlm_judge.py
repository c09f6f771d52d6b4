"""``vlm_judge`` rewards: a pointwise judge on any OpenAI-compatible vision model served by vLLM (e.g.
UnifiedReward-2.0 or Qwen2.5-VL-Instruct).

Each image goes in its own request with a question whose ``{prompt}`` is replaced by the generation prompt; the
reply is read one of two ways (``answer``):

* ``score``: the reply's last number, which must lie in [1, 10] (``8``, ``Score: 8/10``, ``7.5``); reward
  (N - 1) / 9, in [0, 1].
* ``yes_no``: the question asks for yes or no and the request asks for token log-probabilities; at the first
  non-blank token of the reply, P(yes) and P(no) are the summed probabilities of the top tokens that read "yes" /
  "no" (case and spaces ignored); reward P(yes) / (P(yes) + P(no)) (VQAScore-style, the probability mass on
  other tokens is dropped). A reply with neither word among the top tokens is unreadable (retried); one without
  logprobs fails at once (the server does not return them).

Failures follow UnifiedReward-Think's rules (``vllm_chat``): transport errors, 5xx and unreadable replies are
retried then reported (the sample is excluded, never scored 0), a reply cut at max_tokens before a readable
answer is not retried and names the max-tokens setting. Logged: the answer-parse rate and the truncation rate
over the replies received.

Per dataset: besides ``vlm_judge`` (configured by the ``--vlm_judge_*`` flags), ``--vlm_judge_config`` names
further judges (``vlm_judge_<name>``), each a reward name the dataset YAML can list with its weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch
from deepgen_rl.rewards.http_utils import PermanentError, RetryPolicy
from deepgen_rl.rewards.names import VLM_ANSWER_FORMATS, VlmAnswerFormat
from deepgen_rl.rewards.protocol import Choice
from deepgen_rl.rewards.vllm_chat import VllmChatClient, VllmServer

# The --vlm_judge_* flags (config.judge_flags.JudgeRewardFlags), read by attribute: config sits above the rewards.
JudgeRewardFlags = Any

VLM_JUDGE = "vlm_judge"
VLM_JUDGE_START_HINT = ("serve the model with vLLM (`vllm serve MODEL --served-model-name NAME`; see "
                        "docs/datasets_and_editing.md#datasets), or point VLM_JUDGE_URL / --vlm_judge_url (or the judge's 'url' in "
                        "--vlm_judge_config) at it")
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*10(?!\d))?")


@dataclass(frozen=True)
class VlmJudgeSpec:
    """One judge: its reward name, server, served model, question (with ``{prompt}``) and answer format."""

    name: str
    url: str
    model_name: str
    question: str
    answer: VlmAnswerFormat
    max_tokens: int
    top_logprobs: int
    source: str  # where it was configured (named in errors): "--vlm_judge_* flags" or "<config>: judges.<name>"

    def __post_init__(self) -> None:
        if "{prompt}" not in self.question:
            raise ValueError(f"{self.source}: the question must contain '{{prompt}}' where the prompt goes.")
        if self.answer not in VLM_ANSWER_FORMATS:
            raise ValueError(f"{self.source}: answer must be one of {', '.join(VLM_ANSWER_FORMATS)}; "
                             f"got {self.answer!r}.")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{self.source}: url must be an http(s):// URL; got {self.url!r}.")
        for key in ("max_tokens", "top_logprobs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.source}: {key} must be a positive integer; got {value!r}.")


def parse_score(reply: str) -> float:
    """(N - 1) / 9 for the reply's last number N in [1, 10]; ValueError when there is none or it is out of range."""
    numbers = _NUMBER.findall(reply)
    if not numbers:
        raise ValueError(f"no 1-10 score in the reply {reply[-200:]!r}")
    value = float(numbers[-1])
    if not 1.0 <= value <= 10.0:
        raise ValueError(f"score {value:g} is outside 1-10 (reply {reply[-200:]!r})")
    return (value - 1.0) / 9.0


def yes_probability(choice: Choice) -> float:
    """P(yes) / (P(yes) + P(no)) at the first non-blank token of the reply (see the module docstring)."""
    tokens = choice.logprobs.content if choice.logprobs is not None else None
    if not tokens:  # asking again cannot fix the server: not retried
        raise PermanentError("the reply has no token logprobs (answer 'yes_no' needs a server that returns them: "
                             "vLLM's OpenAI server does when asked; use answer 'score' otherwise)")
    position = next((t for t in tokens if t.token.strip()), tokens[0])
    mass = {"yes": 0.0, "no": 0.0}
    candidates = position.top_logprobs or []
    for top in candidates:
        word = top.token.strip().lower()
        if word in mass:
            mass[word] += math.exp(top.logprob)
    if not candidates and position.token.strip().lower() in mass:  # no top list: the chosen token alone
        mass[position.token.strip().lower()] += math.exp(position.logprob)
    total = mass["yes"] + mass["no"]
    if total <= 0.0:
        raise ValueError(f"neither 'yes' nor 'no' among the top tokens {[t.token for t in candidates]} "
                         f"(reply {choice.message.content!r})")
    return mass["yes"] / total


class VlmJudgeReward:
    """A pointwise VLM judge; thread-safe; one request per image, all in flight together."""

    score_range = (0.0, 1.0)

    def __init__(self, spec: VlmJudgeSpec, policy: RetryPolicy, max_concurrency: int, health_timeout_s: float):
        self.spec = spec
        self.name = spec.name
        self.vllm_url = spec.url
        self.service = f"vlm_judge '{spec.name}' server at {spec.url}: {VLM_JUDGE_START_HINT}"
        max_tokens_flag = ("--vlm_judge_max_tokens" if spec.source.startswith("--")
                           else f"max_tokens of {spec.source}")
        server = VllmServer(spec.url, spec.model_name, f"vlm_judge '{spec.name}' server", VLM_JUDGE_START_HINT,
                            "--vlm_judge_model_name (or model_name in --vlm_judge_config)", max_tokens_flag)
        self.chat = VllmChatClient(server, policy, max_concurrency, spec.max_tokens, health_timeout_s, spec.name)

    def check_ready(self) -> None:
        self.chat.check_ready()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        check_batch(images, prompts, group_ids)
        answers = list(self.chat.pool.map(self._ask, images, prompts))
        replies = sum(a.replies for a in answers)
        scores = RewardScores(values=[a.value for a in answers], errors=[a.error for a in answers])
        scores.metrics = {
            "answer_parse_rate": sum(a.parsed for a in answers) / replies if replies else 0.0,
            "truncation_rate": sum(a.truncated for a in answers) / replies if replies else 0.0,
        }
        return scores

    def _ask(self, image: Image.Image, prompt: str):
        question = self.spec.question.replace("{prompt}", prompt)  # not str.format: prompts may hold braces
        what = f"vlm_judge '{self.name}'"
        if self.spec.answer == "yes_no":
            return self.chat.ask_choice([image], question, yes_probability, what, top_logprobs=self.spec.top_logprobs)
        return self.chat.ask([image], question, parse_score, what)

    def close(self) -> None:
        self.chat.close()


# ---- configuration: the flags' judge and the named judges of --vlm_judge_config ----

_JUDGE_KEYS = ("question", "answer", "url", "model_name", "max_tokens", "top_logprobs")


def flag_judge(args: JudgeRewardFlags) -> VlmJudgeSpec:
    return VlmJudgeSpec(VLM_JUDGE, args.vlm_judge_url, args.vlm_judge_model_name, args.vlm_judge_question,
                        args.vlm_judge_answer, args.vlm_judge_max_tokens, args.vlm_judge_top_logprobs,
                        "--vlm_judge_* flags")


def load_judge_specs(args: JudgeRewardFlags) -> dict[str, VlmJudgeSpec]:
    """``vlm_judge`` (the flags) and every judge of ``--vlm_judge_config``; errors name the file and the key."""
    import yaml

    specs = {VLM_JUDGE: flag_judge(args)}
    if not args.vlm_judge_config:
        return specs
    path = Path(args.vlm_judge_config).expanduser()
    if not path.is_file():
        raise ValueError(f"--vlm_judge_config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"--vlm_judge_config {path}: not valid YAML: {err}") from None
    judges = data.get("judges") if isinstance(data, dict) else None
    if not isinstance(judges, dict) or not judges:
        raise ValueError(f"--vlm_judge_config {path}: expected a top-level 'judges' mapping of name -> settings.")
    for name, settings in judges.items():
        where = f"{path}: judges.{name}"
        if not isinstance(name, str) or not name.startswith(VLM_JUDGE + "_"):
            raise ValueError(f"{where}: a judge's name must start with '{VLM_JUDGE}_' (it is its reward name).")
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a mapping with some of {', '.join(_JUDGE_KEYS)}.")
        unknown = sorted(set(settings) - set(_JUDGE_KEYS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(_JUDGE_KEYS)}.")
        specs[name] = replace(specs[VLM_JUDGE], name=name, source=where, **settings)
    return specs

"""``edit_vlm_judge`` reward: an OpenAI-compatible vision model (vLLM) judges an edit, one request per sample.

Each request shows the source image(s) first, then the edited image, and the instruction; the judge reasons and
ends with ``<score>X</score>``, X in [0, 10] (the last such tag counts). The reward is

    r_i = X_i / 10   in [0, 1].

Serve any instruction-following VLM that can compare images (an edit reward model such as UnifiedReward-Edit /
EditReward's VLM, or a general Qwen-VL) with vLLM under ``--edit_judge_model_name``. Same failure rules as every
VLM reward (rewards/vllm_chat.py): a refused, timed-out or unparseable reply is retried, then the sample fails
with the reason (excluded from its group, never a default score). Logged: the answer-parse success rate.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch
from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.vllm_chat import VllmChatClient, VllmServer

EDIT_JUDGE_START_HINT = ("serve an image-editing judge with vLLM, e.g. `UNIFIEDREWARD_MODEL=<edit judge model> "
                         "UNIFIEDREWARD_PORT=18088 UNIFIEDREWARD_SERVED_NAME=EditJudge bash "
                         "scripts/reward_unifiedreward.sh`, and point EDIT_JUDGE_URL / --edit_judge_url at it")
SCORE_MAX = 10.0
EDIT_JUDGE_TEMPLATE = """You are a strict judge of image editing. The first {num_sources} image(s) are the SOURCE; the last image is the EDITED result, made from the source by following this instruction:

「{instruction}」

Judge the edited image on:
- Instruction following: is every requested change made, and made correctly?
- Consistency: is everything the instruction does not ask to change kept as in the source (identity, layout, background, style)?
- Quality: is the result natural, free of artefacts and well blended?

Reason briefly, then end your reply with one overall score from 0 (failed edit) to 10 (perfect edit) in exactly this form:
<score>X</score>"""
_SCORE = re.compile(r"<score>\s*([-+]?\d+(?:\.\d+)?)\s*</score>", re.IGNORECASE)


def parse_edit_score(reply: str) -> float:
    """The last ``<score>X</score>`` of ``reply`` divided by 10; ValueError (a retried reply) if absent or outside
    [0, 10]."""
    matches = _SCORE.findall(reply or "")
    if not matches:
        raise ValueError(f"no '<score>X</score>' in the reply (ends with {(reply or '')[-200:]!r})")
    value = float(matches[-1])
    if not 0.0 <= value <= SCORE_MAX:
        raise ValueError(f"score {value:g} is outside [0, {SCORE_MAX:g}]")
    return value / SCORE_MAX


def render_edit_prompt(instruction: str, num_sources: int, template: str = EDIT_JUDGE_TEMPLATE) -> str:
    return template.replace("{instruction}", instruction).replace("{num_sources}", str(num_sources))


class EditJudgeClient:
    name = "edit_vlm_judge"
    score_range = (0.0, 1.0)
    needs_sources = True  # the reward step passes each sample's source images (``sources=``)

    def __init__(self, url: str, model_name: str, policy: RetryPolicy, max_concurrency: int, max_tokens: int,
                 health_timeout_s: float, template: str = EDIT_JUDGE_TEMPLATE) -> None:
        if "{instruction}" not in template:
            raise ValueError("the edit judge template must contain '{instruction}' where the instruction goes.")
        self.template = template
        self.service = f"edit judge server at {url}: {EDIT_JUDGE_START_HINT}"
        server = VllmServer(url, model_name, "edit judge server", EDIT_JUDGE_START_HINT, "--edit_judge_model_name")
        self.chat = VllmChatClient(server, policy, max_concurrency, max_tokens, health_timeout_s, "edit-judge")

    def check_ready(self) -> None:
        self.chat.check_ready()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int],
              sources: Optional[Sequence[Sequence[Image.Image]]] = None) -> RewardScores:
        """images: N edited results; prompts: their instructions; sources: per sample its source images."""
        n = check_batch(images, prompts, group_ids)
        if sources is None or len(sources) != n or any(len(row) == 0 for row in sources):
            return RewardScores.all_failed(n, "edit_vlm_judge needs each sample's source images: use it only on "
                                              "edit datasets (JSONL with source_images)")
        futures = [self.chat.pool.submit(self.chat.ask, [*sources[i], images[i]],
                                         render_edit_prompt(prompts[i], len(sources[i]), self.template),
                                         parse_edit_score, f"edit judge sample {i}") for i in range(n)]
        answers = [future.result() for future in futures]
        replies = sum(answer.replies for answer in answers)
        scores = RewardScores(values=[answer.value for answer in answers], errors=[answer.error for answer in answers])
        scores.metrics = {"answer_parse_rate": sum(a.parsed for a in answers) / replies if replies else 0.0}
        return scores

    def close(self) -> None:
        self.chat.close()

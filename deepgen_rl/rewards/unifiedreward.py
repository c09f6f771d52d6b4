"""``unifiedreward_think`` reward: pairwise UnifiedReward-Think on a vLLM server (OpenAI chat API).

Within one prompt's group of G images every pair is judged once (C(G, 2) requests; the lower sample index is
shown as "Image 1"); an image's reward is its win rate

    r_i = wins_i / comparisons_i   over the comparisons of i that got a parsed verdict.

The pairs of ALL groups are in flight together (up to ``max_concurrency``; the reference judged groups one
after another). A pair whose reply is refused, times out or cannot be parsed is retried, then dropped and
counted; an image whose comparisons all failed has no reward (excluded, never 0.5). Logged: the share of
pairs judged and the answer-parse success rate over every reply received (retries included).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch, groups_by_id
from deepgen_rl.rewards.http_utils import RetryPolicy, png_data_url
from deepgen_rl.rewards.vllm_chat import VllmChatClient, VllmServer
from deepgen_rl.rewards.unifiedreward_template import (
    PAIRWISE_THINK_TEMPLATE,
    parse_pairwise_answer,
    render_pairwise_prompt,
)

UNIFIEDREWARD_START_HINT = ("start it with `bash scripts/reward_unifiedreward.sh` (vLLM), or point "
                            "UNIFIEDREWARD_THINK_URL / --unifiedreward_think_url at it")


@dataclass(frozen=True)
class PairVerdict:
    """One judged pair: sample indices ``first`` (shown as Image 1) and ``second``; ``winner`` is one of them,
    or None when the pair failed (``error`` says why). ``replies``/``parsed``: HTTP-200 replies received and
    how many of them had a readable answer."""

    first: int
    second: int
    winner: Optional[int]
    error: Optional[str]
    replies: int
    parsed: int


def win_rates(num_samples: int, group_ids: Sequence[int], verdicts: Sequence[PairVerdict]) -> RewardScores:
    """r_i = wins_i / comparisons_i over parsed verdicts; None (with the reason) when i has no parsed verdict."""
    wins = [0] * num_samples
    comparisons = [0] * num_samples
    first_error: list[Optional[str]] = [None] * num_samples
    for verdict in verdicts:
        if verdict.winner is None:
            for index in (verdict.first, verdict.second):
                first_error[index] = first_error[index] or verdict.error
            continue
        comparisons[verdict.first] += 1
        comparisons[verdict.second] += 1
        wins[verdict.winner] += 1
    group_sizes = {gid: len(members) for gid, members in groups_by_id(group_ids).items()}
    values: list[Optional[float]] = []
    errors: list[Optional[str]] = []
    for index in range(num_samples):
        if comparisons[index]:
            values.append(wins[index] / comparisons[index])
            errors.append(None)
        elif group_sizes[int(group_ids[index])] < 2:
            values.append(None)
            errors.append("pairwise reward needs >= 2 samples in the group; this group has 1")
        else:
            values.append(None)
            errors.append(f"every comparison of this image failed; first error: {first_error[index]}")
    return RewardScores(values=values, errors=errors)


def _read_answer(reply: str) -> int:
    answer = parse_pairwise_answer(reply)
    if answer is None:
        raise ValueError(f"no '<answer>Image N is better</answer>' in the reply (ends with {reply[-200:]!r})")
    return answer


class UnifiedRewardThinkClient:
    name = "unifiedreward_think"
    score_range = (0.0, 1.0)  # a win rate

    def __init__(self, url: str, model_name: str, policy: RetryPolicy, max_concurrency: int, max_tokens: int,
                 health_timeout_s: float, template: str = PAIRWISE_THINK_TEMPLATE) -> None:
        if "{prompt}" not in template:
            raise ValueError("the UnifiedReward template must contain '{prompt}' where the caption goes.")
        self.url = url
        self.service = f"UnifiedReward-Think server at {url}: {UNIFIEDREWARD_START_HINT}"
        self.template = template
        server = VllmServer(url, model_name, "UnifiedReward-Think server", UNIFIEDREWARD_START_HINT,
                            "--unifiedreward_model_name")
        self.chat = VllmChatClient(server, policy, max_concurrency, max_tokens, health_timeout_s, "unifiedreward")

    def check_ready(self) -> None:
        """The server answers /health and serves ``model_name`` (vLLM's --served-model-name)."""
        self.chat.check_ready()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        pairs = [pair for members in groups_by_id(group_ids).values() for pair in itertools.combinations(members, 2)]
        needed = sorted({index for pair in pairs for index in pair})
        urls = dict(zip(needed, self.chat.pool.map(lambda i: png_data_url(images[i]), needed)))
        futures = [self.chat.pool.submit(self._judge_pair, first, second, prompts[first], urls[first], urls[second])
                   for first, second in pairs]
        verdicts = [future.result() for future in futures]
        scores = win_rates(n, group_ids, verdicts)
        replies = sum(v.replies for v in verdicts)
        scores.metrics = {
            "pairs": float(len(pairs)),
            "pairs_judged": float(sum(v.winner is not None for v in verdicts)),
            "answer_parse_rate": sum(v.parsed for v in verdicts) / replies if replies else 0.0,
        }
        return scores

    def _judge_pair(self, first: int, second: int, prompt: str, url_first: str, url_second: str) -> PairVerdict:
        answer = self.chat.ask([url_first, url_second], render_pairwise_prompt(prompt, self.template), _read_answer,
                               f"UnifiedReward pair ({first}, {second})")
        winner = None if answer.value is None else (first if answer.value == 1 else second)
        return PairVerdict(first, second, winner, answer.error, answer.replies, answer.parsed)

    def close(self) -> None:
        self.chat.close()

"""``unifiedreward_think`` reward: pairwise UnifiedReward-Think on a vLLM server (OpenAI chat API).

Within one prompt's group of G images every pair is judged (C(G, 2) pairs); an image's reward is its win rate

    r_i = wins_i / comparisons_i   over the pairs of i that got a parsed verdict (``pairwise.win_rates``).

Which image is shown first follows ``--unifiedreward_pair_order``: 'random' by default (drawn per reward call from
the seed, the call index and the rank), 'both' (each pair judged in both orders, verdicts averaged) or 'fixed'
(lower index first, the reference's order, which turns the judge's position bias into index-ordered rewards).
The requests of ALL groups are in flight together (up to ``max_concurrency``; the reference judged groups one
after another). A pair whose reply is refused, times out or cannot be parsed is retried, then dropped and
counted; a reply cut at max_tokens is not retried (it fails naming --unifiedreward_max_tokens); an image whose
comparisons all failed has no reward (excluded, never 0.5). Logged (``pairwise.verdict_metrics``): pairs judged,
answer-parse rate, truncation rate, the share of "Image 1" verdicts and, in 'both' mode, the agreement rate.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from PIL import Image

from deepgen_rl.core.distributed import rank_and_world
from deepgen_rl.rewards.names import PAIR_ORDERS, PairOrder
from deepgen_rl.rewards.base import RewardScores, check_batch, groups_by_id
from deepgen_rl.rewards.http_utils import RetryPolicy, png_data_url
from deepgen_rl.rewards.pairwise import PairVerdict, order_rng, presentations, verdict_metrics, win_rates
from deepgen_rl.rewards.vllm_chat import VllmChatClient, VllmServer
from deepgen_rl.rewards.unifiedreward_template import (
    PAIRWISE_THINK_TEMPLATE,
    parse_pairwise_answer,
    render_pairwise_prompt,
)

__all__ = ["PairVerdict", "UnifiedRewardThinkClient", "win_rates"]

UNIFIEDREWARD_START_HINT = ("start it with `bash scripts/reward_unifiedreward.sh` (vLLM), or point "
                            "UNIFIEDREWARD_THINK_URL / --unifiedreward_think_url at it")


def _read_answer(reply: str) -> int:
    answer = parse_pairwise_answer(reply)
    if answer is None:
        raise ValueError(f"no '<answer>Image N is better</answer>' in the reply (ends with {reply[-200:]!r})")
    return answer


class UnifiedRewardThinkClient:
    name = "unifiedreward_think"
    score_range = (0.0, 1.0)  # a win rate

    def __init__(self, url: str, model_name: str, policy: RetryPolicy, max_concurrency: int, max_tokens: int,
                 health_timeout_s: float, template: str = PAIRWISE_THINK_TEMPLATE, pair_order: PairOrder = "random",
                 order_seed: int = 0) -> None:
        if "{prompt}" not in template:
            raise ValueError("the UnifiedReward template must contain '{prompt}' where the caption goes.")
        if pair_order not in PAIR_ORDERS:
            raise ValueError(f"--unifiedreward_pair_order must be one of {', '.join(PAIR_ORDERS)}; got {pair_order!r}.")
        self.url = self.vllm_url = url
        self.pair_order, self.order_seed = pair_order, order_seed
        # Reward calls so far (next() is atomic): with the seed and the rank they seed each call's pair orders.
        self._calls = itertools.count()
        self.service = f"UnifiedReward-Think server at {url}: {UNIFIEDREWARD_START_HINT}"
        self.template = template
        server = VllmServer(url, model_name, "UnifiedReward-Think server", UNIFIEDREWARD_START_HINT,
                            "--unifiedreward_model_name", "--unifiedreward_max_tokens")
        self.chat = VllmChatClient(server, policy, max_concurrency, max_tokens, health_timeout_s, "unifiedreward")

    def check_ready(self) -> None:
        """The server answers /health and serves ``model_name`` (vLLM's --served-model-name)."""
        self.chat.check_ready()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        pairs = [pair for members in groups_by_id(group_ids).values() for pair in itertools.combinations(members, 2)]
        call = next(self._calls)
        rng = order_rng(self.order_seed, rank_and_world()[0], call) if self.pair_order == "random" else None
        shown = presentations(pairs, self.pair_order, rng)
        needed = sorted({index for pair in pairs for index in pair})
        urls = dict(zip(needed, self.chat.pool.map(lambda i: png_data_url(images[i]), needed)))
        futures = [self.chat.pool.submit(self._judge_pair, first, second, prompts[first], urls[first], urls[second])
                   for first, second in shown]
        verdicts = [future.result() for future in futures]
        scores = win_rates(n, group_ids, verdicts)
        scores.metrics = verdict_metrics(verdicts, len(pairs))
        return scores

    def _judge_pair(self, first: int, second: int, prompt: str, url_first: str, url_second: str) -> PairVerdict:
        answer = self.chat.ask([url_first, url_second], render_pairwise_prompt(prompt, self.template), _read_answer,
                               f"UnifiedReward pair ({first}, {second})")
        winner = None if answer.value is None else (first if answer.value == 1 else second)
        return PairVerdict(first, second, winner, answer.error, answer.replies, answer.parsed, answer.truncated)

    def close(self) -> None:
        self.chat.close()

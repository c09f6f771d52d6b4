"""Pure parts of pairwise judging: which image a judge sees first, and win rates from the verdicts.

Legend: N samples (B prompts x G images), P = C(G, 2) pairs per group; a pair (a, b) has a < b.

A pairwise VLM judge favours one position; showing the lower sample index first always (the reference) turns
that bias into rewards ordered by index: an always-"Image 1" judge gives a group of 4 [1, 2/3, 1/3, 0].
``presentations`` draws each pair's order at random (or shows both orders), so such a judge gives every image
0.5 in expectation, and its bias shows in the logged Image-1 share instead of in the rewards.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

from deepgen_rl.rewards.names import PairOrder
from deepgen_rl.rewards.base import RewardScores, groups_by_id


@dataclass(frozen=True)
class PairVerdict:
    """One judged presentation: sample ``first`` shown as Image 1, ``second`` as Image 2; ``winner`` is one of
    them, or None when the request failed (``error`` says why). ``replies``/``parsed``: HTTP-200 replies received
    and how many had a readable answer; ``truncated``: replies cut at max_tokens."""

    first: int
    second: int
    winner: Optional[int]
    error: Optional[str]
    replies: int
    parsed: int
    truncated: int = 0


def order_rng(seed: int, rank: int, call: int) -> random.Random:
    """The generator of one reward call's pair orders: reproducible from (seed, rank, call index)."""
    return random.Random(f"pair-order:{seed}:{rank}:{call}")


def presentations(pairs: Sequence[tuple[int, int]], order: PairOrder,
                  rng: Optional[random.Random] = None) -> list[tuple[int, int]]:
    """(shown first, shown second) for each request: 'fixed' -> (a, b); 'random' -> (a, b) or (b, a), each with
    probability 1/2 from ``rng``; 'both' -> (a, b) and (b, a)."""
    if order == "fixed":
        return list(pairs)
    if order == "both":
        return [shown for a, b in pairs for shown in ((a, b), (b, a))]
    if rng is None:
        raise ValueError("pair order 'random' needs a random generator")
    return [(b, a) if rng.random() < 0.5 else (a, b) for a, b in pairs]


def win_rates(num_samples: int, group_ids: Sequence[int], verdicts: Sequence[PairVerdict]) -> RewardScores:
    """r_i = sum over i's judged pairs of (share of that pair's verdicts i won) / (number of i's judged pairs).

    A pair shown in both orders counts once, with the mean of its verdicts (agreeing orders: 1 or 0; disagreeing:
    0.5 each); one failed order leaves the other's verdict. None (with the reason) when no pair of i was judged.
    """
    by_pair: dict[tuple[int, int], list[PairVerdict]] = defaultdict(list)
    for verdict in verdicts:
        by_pair[(min(verdict.first, verdict.second), max(verdict.first, verdict.second))].append(verdict)
    wins = [0.0] * num_samples
    comparisons = [0] * num_samples
    first_error: list[Optional[str]] = [None] * num_samples
    for (a, b), judged_pair in by_pair.items():
        winners = [v.winner for v in judged_pair if v.winner is not None]
        if not winners:
            for index in (a, b):
                first_error[index] = first_error[index] or next(v.error for v in judged_pair)
            continue
        share_a = sum(winner == a for winner in winners) / len(winners)
        wins[a] += share_a
        wins[b] += 1.0 - share_a
        comparisons[a] += 1
        comparisons[b] += 1
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


def verdict_metrics(verdicts: Sequence[PairVerdict], num_pairs: int) -> dict[str, float]:
    """Scalars to log: pairs, requests, pairs with a verdict, answer-parse rate and truncation rate (over replies),
    the share of verdicts for Image 1 (0.5 for an unbiased judge), and when a pair was judged in both orders, the
    share of such pairs whose two verdicts name the same image."""
    replies = sum(v.replies for v in verdicts)
    judged = [v for v in verdicts if v.winner is not None]
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for v in judged:
        by_pair[(min(v.first, v.second), max(v.first, v.second))].append(v.winner)
    metrics = {
        "pairs": float(num_pairs),
        "requests": float(len(verdicts)),
        "pairs_judged": float(len(by_pair)),
        "answer_parse_rate": sum(v.parsed for v in verdicts) / replies if replies else 0.0,
        "truncation_rate": sum(v.truncated for v in verdicts) / replies if replies else 0.0,
    }
    if judged:
        metrics["image1_share"] = sum(v.winner == v.first for v in judged) / len(judged)
    both = [winners for winners in by_pair.values() if len(winners) == 2]
    if both:
        metrics["both_orders_agreement"] = sum(w[0] == w[1] for w in both) / len(both)
    return metrics

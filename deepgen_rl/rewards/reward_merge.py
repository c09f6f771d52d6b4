"""One RewardBatch from the RewardBatches of consecutive row chunks (the streamed reward phase scores each rollout
micro-batch's whole groups on its own; the advantage phase needs the rank's batch).

Rows keep their order; failures are re-indexed to the batch's rows. Reward metrics combine as the serial phase
computes them: counts add up, ``*seconds`` add up (time spent scoring, hidden or not), ``deadline_exceeded`` is the
max, and a ``*_rate`` is the mean over chunks weighted by the reward's ``pairs`` count in that chunk (or by the
chunk's rows), i.e. the batch's rate whenever each pair took as many replies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Sequence

import torch

from deepgen_rl.rewards.reward_step import RewardBatch


def merge_metrics(parts: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """[(metrics of a chunk, its rows)] -> the batch's metrics (rules in the module docstring)."""
    merged: dict[str, float] = {}
    rate_weights: dict[str, float] = defaultdict(float)
    for metrics, rows in parts:
        for key, value in metrics.items():
            if key.endswith("_rate"):
                weight = float(metrics.get(key.rsplit("/", 1)[0] + "/pairs", rows)) if "/" in key else float(rows)
                merged[key] = merged.get(key, 0.0) + weight * value
                rate_weights[key] += weight
            elif key.endswith("deadline_exceeded"):
                merged[key] = max(merged.get(key, 0.0), value)
            else:
                merged[key] = merged.get(key, 0.0) + value
    for key, weight in rate_weights.items():
        merged[key] = merged[key] / weight if weight else 0.0
    return merged


def merge_reward_batches(parts: Sequence[RewardBatch]) -> RewardBatch:
    """Chunks of consecutive rows, in row order -> one RewardBatch of all their rows."""
    if not parts:
        raise ValueError("no reward chunks to merge.")
    names = parts[0].names
    failures, offset = [], 0
    counts = {name: 0 for name in names}
    for part in parts:
        if part.names != names:
            raise ValueError(f"reward chunks disagree on the reward columns: {part.names} vs {names}.")
        failures += [replace(failure, sample=failure.sample + offset) for failure in part.failures]
        for name, count in part.failure_counts.items():
            counts[name] = counts.get(name, 0) + count
        offset += part.scores.shape[0]
    return RewardBatch(names=names, scores=torch.cat([p.scores for p in parts]),
                       weights=torch.cat([p.weights for p in parts]), valid=torch.cat([p.valid for p in parts]),
                       failed=torch.cat([p.failed for p in parts]), failure_counts=counts, failures=failures,
                       metrics=merge_metrics([(p.metrics, p.scores.shape[0]) for p in parts]))

"""The advantage phase of a GRPO step: rewards of ALL ranks -> per-sample advantages and their metrics.

Legend: N samples of the rank, K rewards, N_all samples of all ranks.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.rl import AdvantageResult, compute_advantages

from ..core.distributed import all_gather_cat, all_reduce_sum
from .step_metrics import advantage_metrics, reward_metrics

logger = logging.getLogger(__name__)


def global_advantages(rewards: RewardBatch, args, device: torch.device,
                      step: int) -> tuple[Optional[AdvantageResult], dict[str, float]]:
    """GRPO / GDPO advantages [N] of this rank's samples, normalised over all ranks (collectives), and the reward
    and advantage metrics of all ranks; None when no sample of any rank has a reward (``step`` names it)."""
    valid = ~rewards.failed
    names = list(rewards.names)
    failed_all = all_gather_cat(rewards.failed, device)  # [N_all] bool, the same on every rank
    metrics = reward_metrics(names, all_gather_cat(rewards.scores, device),
                             all_gather_cat(rewards.weights, device), failed_all)
    if bool(failed_all.all()):
        logger.warning("every reward of step %d failed on every rank: the step is skipped.", step)
        return None, metrics
    result = compute_advantages(args.atrain_adv_type, rewards.scores, rewards.weights, args.rollout_n,
                                valid=valid, std_floor=args.reward_std_floor, clip=args.advantage_clip,
                                zero_variance_rtol=args.zero_variance_rtol)
    counts = all_reduce_sum(torch.tensor([result.zero_variance_group_fraction * result.num_groups,
                                          result.num_groups, result.clip_fraction * result.num_valid,
                                          result.num_valid], dtype=torch.float64), device)
    metrics["adv/zero_variance_group_fraction"] = float(counts[0] / counts[1].clamp_min(1))
    metrics["adv/clip_fraction"] = float(counts[2] / counts[3].clamp_min(1))
    metrics.update(advantage_metrics(all_gather_cat(result.advantages, device),
                                     all_gather_cat(result.valid, device)))
    return result, metrics

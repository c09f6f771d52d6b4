"""Rewards: the name -> reward table, HTTP clients of the reward servers, local rewards, the reward step.

Light on purpose (the OCR server imports this package): import ``deepgen_rl.rewards.reward_step`` for
``RewardStep`` / ``RewardBatch`` (torch) and the reward modules themselves for the implementations.
"""

from deepgen_rl.rewards.base import RewardFunction, RewardScores, groups_by_id
from deepgen_rl.rewards.registry import REWARD_NAMES, build_rewards

__all__ = [
    "REWARD_NAMES",
    "RewardFunction",
    "RewardScores",
    "build_rewards",
    "groups_by_id",
]

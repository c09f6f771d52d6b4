"""Reward-hacking monitor: image statistics of the rollouts, drift and held-out divergence alarms, the best
checkpoint and monitor.png (docs/monitoring.md). Pure of the trainer: the trainer calls it."""

from .alarms import Alarm, DivergenceAlarm, DriftAlarm
from .best import BEST_CHECKPOINT_NAME, protected_checkpoint, read_best
from .monitor import MONITOR_PNG, ON_REWARD_HACKING, MonitorSettings, RewardHackingMonitor, held_out_score
from .stats import STATS

__all__ = ["Alarm", "BEST_CHECKPOINT_NAME", "DivergenceAlarm", "DriftAlarm", "MONITOR_PNG", "MonitorSettings",
           "ON_REWARD_HACKING", "RewardHackingMonitor", "STATS", "held_out_score", "protected_checkpoint",
           "read_best"]

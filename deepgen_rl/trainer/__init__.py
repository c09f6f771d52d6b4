"""The GRPO trainer of DeepGen under DeepSpeed: phases in ``grpo_trainer``, one concern per module."""

from deepgen_rl.trainer.batching import BatchPlan, plan_batches, total_training_steps
from deepgen_rl.trainer.checkpointing import TrainerState, list_checkpoints, resolve_resume_path
from deepgen_rl.trainer.grpo_trainer import DeepGenGRPOTrainer, EvalHook, RolloutBatch
from deepgen_rl.trainer.logging_utils import MetricsLogger, TrackerSettings, read_metrics
from deepgen_rl.trainer.trainable import LoraSettings

__all__ = [
    "BatchPlan", "DeepGenGRPOTrainer", "EvalHook", "LoraSettings", "MetricsLogger", "RolloutBatch", "TrackerSettings",
    "TrainerState", "list_checkpoints", "plan_batches", "read_metrics", "resolve_resume_path", "total_training_steps",
]

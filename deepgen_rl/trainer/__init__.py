"""The GRPO trainer of DeepGen under DeepSpeed: phases in ``grpo_trainer``, the run around them in ``run_loop``
(``TrainingRun``, what build_trainer returns), one concern per module."""

from deepgen_rl.trainer.batching import BatchPlan, plan_batches, total_training_steps
from deepgen_rl.trainer.checkpointing import TrainerState, list_checkpoints, resolve_resume_path
from deepgen_rl.trainer.grpo_trainer import DeepGenGRPOTrainer, EvalHook, RolloutBatch
from deepgen_rl.trainer.logging_utils import MetricsLogger, TrackerSettings, read_metrics
from deepgen_rl.trainer.run_loop import TrainingRun
from deepgen_rl.trainer.trainable import LoraSettings

__all__ = [
    "BatchPlan", "DeepGenGRPOTrainer", "EvalHook", "LoraSettings", "MetricsLogger", "RolloutBatch", "TrackerSettings",
    "TrainerState", "TrainingRun", "list_checkpoints", "plan_batches", "read_metrics", "resolve_resume_path", "total_training_steps",
]

"""The sample grid of a step: its rollout images with their rewards, or the EMA weights' images (--ema_decay).

Legend: N = B*G samples of the rank (B prompts, G = --rollout_n).
"""

from __future__ import annotations

from deepgen_rl.model.prompt_padding import padded_to_at_least
from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.trainer.edit_rollout import group_sources
from deepgen_rl.trainer.ema import ema_sample_images
from deepgen_rl.trainer.global_draws import rollout_noise
from deepgen_rl.trainer.logging_utils import MetricsLogger
from deepgen_rl.trainer.rollout_batch import RolloutBatch
from deepgen_rl.trainer.step_metrics import weighted_reward


def log_sample_grid(trainer, metrics_logger: MetricsLogger, batch: RolloutBatch,
                    rewards: RewardBatch, step: int) -> None:
    """Step ``step``'s sample grid: its rollout images with their rewards, or under --ema_decay the EMA weights'
    images of the same prompts and noise (only rank 0 writes grids). ``trainer``: the DeepGenGRPOTrainer whose
    ``_after_step`` calls this (grpo_trainer.py imports this module, so it is not imported back)."""
    args = trainer.args
    sources = group_sources(batch.trajectory.edit, args.rollout_n, args.image_height, args.image_width)
    if trainer.ema is None:
        scores = weighted_reward(rewards.scores, rewards.weights).tolist()
        metrics_logger.log_samples(step, batch.images, batch.trajectory.prompts, scores, args.rollout_n, sources)
    elif trainer.rank == 0 or trainer.ema.collective:  # from step ``step``'s rollout seed (drawn at step - 1)
        # The sharded EMA is swapped in through collectives (and ZeRO-3's forwards gather): every rank generates.
        generator = rollout_noise(args.seed, step - 1, trainer.rank, trainer.plan.samples_per_rank, trainer.device)
        with padded_to_at_least(batch.prompt_length):  # the rollout's conditioning (model/prompt_padding.py)
            images = ema_sample_images(trainer.ema, trainer.model, batch.unique_prompts, args, generator,
                                       batch.trajectory.edit)
        if trainer.rank == 0:
            metrics_logger.log_samples(step, images, batch.trajectory.prompts, None, args.rollout_n, sources)

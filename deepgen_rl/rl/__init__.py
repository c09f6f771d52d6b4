"""RL math: group advantages (GRPO / GDPO / grpo_global_std / reinforcepp), the clipped policy loss, KL to the
reference, SFT-aux, step sampler."""

from deepgen_rl.rl.advantages import (
    AdvantageResult,
    batch_mean_std,
    batch_normalize,
    batch_std_advantages,
    compute_advantages,
    gdpo_advantages,
    group_normalize,
    grpo_advantages,
)
from deepgen_rl.rl.losses import (
    PolicyLossResult,
    clip_band,
    clipped_policy_loss,
    flow_matching_loss,
    grpo_loss,
    kl_v_based,
    kl_x_based,
    masked_mean,
    noised_latents,
    reference_kl,
)
from deepgen_rl.rl.timesteps import num_train_steps, sample_train_steps

__all__ = [
    "AdvantageResult", "PolicyLossResult", "batch_mean_std", "batch_normalize", "batch_std_advantages", "clip_band",
    "clipped_policy_loss", "compute_advantages",
    "flow_matching_loss", "gdpo_advantages", "group_normalize", "grpo_advantages", "grpo_loss", "kl_v_based",
    "kl_x_based", "masked_mean", "noised_latents", "num_train_steps", "reference_kl", "sample_train_steps",
]

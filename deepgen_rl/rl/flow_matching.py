"""The flow-matching (SFT-aux) loss of a model on encoded latents: the trainer's --sftaux_coef term
(trainer/objective.py ``sftaux_objective``) and the tiny model's pretraining (model/tiny_pretrain.py) share it.

docs/algorithms.md#sft-aux. Legend: n samples, C/h/w latent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepgen_rl.rl.losses import flow_matching_loss, noised_latents


def flow_matching_objective(model: torch.nn.Module, x0: Tensor, prompt_embeds: Tensor, pooled: Tensor,
                            generator: torch.Generator) -> Tensor:
    """The SFT-aux loss on latents already encoded: x0 [n, C, h, w] (scaled VAE latents, float32) with their
    conditioning; draws eps ~ N(0, I) then t ~ U(0, 1) from ``generator`` (in that order)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
    t = torch.rand((x0.shape[0],), generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
    velocity = model.predict_velocity(noised_latents(x0, noise, t), t, prompt_embeds, pooled).float()
    return flow_matching_loss(velocity, x0, noise)

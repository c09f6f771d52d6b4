"""Which parameters GRPO updates (--trainable_modules, --use_lora).

``DeepGenModel.set_trainable`` unfreezes the chosen attributes except the parameters no gradient can reach
(deepgen_rl/model/unreachable.py), so "trainable" means "receives a gradient".

LoRA (--use_lora): adapters on the DiT attention projections; the DiT's own weights stay frozen and the
reference policy is the same model with its adapters disabled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# SD3 joint-attention projections (image and text streams).
DIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class LoraSettings:
    """--lora_rank / --lora_alpha; the adapter's output is scaled by alpha / rank (peft's LoRA)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = DIT_LORA_TARGETS


def add_dit_lora(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Freeze the DiT weights and add trainable LoRA adapters (peft) on its attention projections."""
    from peft import LoraConfig

    model.transformer.requires_grad_(False)
    model.transformer.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                                             target_modules=list(settings.target_modules)))


def configure_trainable(model: torch.nn.Module, trainable_modules: str, lora: LoraSettings | None) -> list[str]:
    """Set requires_grad for --trainable_modules (+ LoRA); returns the trained attribute names (e.g. transformer)."""
    names = model.set_trainable(trainable_modules)  # leaves the parts no gradient reaches frozen
    logger.info("kept frozen (no gradient reaches them): %s", ", ".join(model.unreachable_parameters))
    if lora is not None:
        add_dit_lora(model, lora)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable: %s%s, %.2fM parameters", ", ".join(names), " (DiT via LoRA)" if lora else "", count / 1e6)
    return names

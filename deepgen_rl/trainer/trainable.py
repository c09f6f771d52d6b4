"""Which parameters GRPO updates (--trainable_modules, --use_lora).

``DeepGenModel.set_trainable`` unfreezes whole attributes. Parameters that no gradient can reach stay frozen
here, so "trainable" means "receives a gradient" (and costs no optimizer memory for nothing):

* DiT: the text-stream query projection of SD3's last joint block, whose text outputs are discarded.
* LLM (when it trains): the vision tower (~670M parameters in the 3B model), the LM head, the final norm and
  the decoder layers after the deepest fused layer (hidden_states[i] is the output of decoder layer i - 1).

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
    rank: int
    alpha: float


def freeze_unreachable_llm_parts(model: torch.nn.Module) -> list[str]:
    """Freeze the LLM parameters text-to-image conditioning cannot reach; returns their name prefixes."""
    lmm = model.lmm
    frozen = []
    language_model = lmm.model.language_model
    deepest = max(model.fusion_layers)  # hidden_states index; layers >= deepest do not feed the fusion
    tied = lmm.lm_head.weight is lmm.get_input_embeddings().weight
    parts = {"lmm.model.visual": lmm.model.visual, "lmm.model.language_model.norm": language_model.norm}
    if not tied:
        parts["lmm.lm_head"] = lmm.lm_head
    for index in range(deepest, len(language_model.layers)):
        parts[f"lmm.model.language_model.layers.{index}"] = language_model.layers[index]
    for name, module in parts.items():
        module.requires_grad_(False)
        frozen.append(name)
    return frozen


def freeze_dead_dit_parts(model: torch.nn.Module) -> list[str]:
    """Freeze DiT parameters that cannot affect the output: in SD3's last joint block (``context_pre_only``) the
    text stream's output is dropped, so its query projection ``attn.add_q_proj`` only feeds discarded rows."""
    frozen = []
    for index, block in enumerate(model.transformer.transformer_blocks):
        attn = block.attn
        if getattr(attn, "context_pre_only", False) and getattr(attn, "add_q_proj", None) is not None:
            attn.add_q_proj.requires_grad_(False)
            frozen.append(f"transformer.transformer_blocks.{index}.attn.add_q_proj")
    return frozen


def add_dit_lora(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Freeze the DiT weights and add trainable LoRA adapters (peft) on its attention projections."""
    from peft import LoraConfig

    model.transformer.requires_grad_(False)
    model.transformer.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                                             target_modules=list(DIT_LORA_TARGETS)))


def configure_trainable(model: torch.nn.Module, trainable_modules: str, lora: LoraSettings | None) -> list[str]:
    """Set requires_grad for --trainable_modules (+ LoRA); returns the trained attribute names (e.g. transformer)."""
    names = model.set_trainable(trainable_modules)
    if lora is None:
        logger.info("DiT parts frozen (they never reach the output): %s", ", ".join(freeze_dead_dit_parts(model)))
    if "lmm" in names:
        logger.info("LLM parts frozen (no gradient reaches them in text-to-image): %s",
                    ", ".join(freeze_unreachable_llm_parts(model)))
    if lora is not None:
        add_dit_lora(model, lora)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable: %s%s, %.2fM parameters", ", ".join(names), " (DiT via LoRA)" if lora else "", count / 1e6)
    return names

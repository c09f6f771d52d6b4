"""Parameters of a trained module that no gradient can reach in text-to-image training.

``DeepGenModel.set_trainable`` keeps them frozen, so "trainable" means "receives a gradient": the optimizer
holds no state for them, RL checkpoints do not carry them, and the loader does not demand them from CHECKPOINT.

* DiT: the text-stream query projection of SD3's last joint block, whose text outputs are discarded.
* LLM (when it trains): the vision tower (~670M parameters in the 3B model), the LM head (unless tied to the
  input embeddings), the final norm and the decoder layers after the deepest fused layer (hidden_states[i] is
  the output of decoder layer i - 1).
"""

from __future__ import annotations

from torch import nn


def freeze_dead_dit_parts(transformer: nn.Module) -> list[str]:
    """In SD3's last joint block (``context_pre_only``) the text stream's output is dropped, so its query
    projection ``attn.add_q_proj`` only feeds discarded rows. Returns the frozen names (under ``transformer.``)."""
    frozen = []
    for index, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        if getattr(attn, "context_pre_only", False) and getattr(attn, "add_q_proj", None) is not None:
            attn.add_q_proj.requires_grad_(False)
            frozen.append(f"transformer.transformer_blocks.{index}.attn.add_q_proj")
    return frozen


def freeze_unreachable_llm_parts(lmm: nn.Module, fusion_layers: list[int]) -> list[str]:
    """Freeze the Qwen2.5-VL parameters the fused hidden states do not depend on; returns their name prefixes."""
    language_model = lmm.model.language_model
    deepest = max(fusion_layers)  # hidden_states index; decoder layers >= deepest do not feed the fusion
    parts = {"lmm.model.visual": lmm.model.visual, "lmm.model.language_model.norm": language_model.norm}
    if lmm.lm_head.weight is not lmm.get_input_embeddings().weight:
        parts["lmm.lm_head"] = lmm.lm_head
    for index in range(deepest, len(language_model.layers)):
        parts[f"lmm.model.language_model.layers.{index}"] = language_model.layers[index]
    for module in parts.values():
        module.requires_grad_(False)
    return list(parts)

"""The Qwen2.5-VL vision tower in text-to-image training: never run, so never on the GPU.

Text-to-image conditioning feeds the LLM token embeddings and meta queries only (``DeepGenModel.forward``); the
vision tower (~0.67 B parameters in Qwen2.5-VL-3B, ~1.25 GiB in bf16) only encodes reference images, which
only editing (Kontext, docs/upstream_compatibility.md#editing-kontext) has. Unless the dataset YAML has an edit dataset
(trainer/edit_rollout.py), the trainer drops the tower before DeepSpeed moves the model to the GPU: no GPU memory,
no reference-copy share, and its host memory is freed. RL checkpoints exclude frozen parameters, so they do not
change. With an edit dataset the tower stays (frozen) and moves to the GPU with the model.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def drop_vision_tower(model: nn.Module) -> int:
    """Detach ``model.lmm.model.visual`` (set it to None) and return its parameter count (0 if already gone).

    Call it after ``set_trainable`` (which names the tower among the LLM's unreachable parts) and before the
    reference copy and ``deepspeed.initialize``. A text-only Qwen2.5-VL forward never reads ``visual``.
    """
    inner = model.lmm.model
    tower = getattr(inner, "visual", None)
    if tower is None:
        return 0
    if any(p.requires_grad for p in tower.parameters()):
        raise RuntimeError("the Qwen2.5-VL vision tower is marked trainable, but no text-to-image gradient reaches it")
    count = sum(p.numel() for p in tower.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in tower.parameters())
    inner.visual = None  # nn.Module keeps the slot: state_dict, .to() and parameters() skip it
    logger.info("Qwen2.5-VL vision tower dropped (%.0fM parameters, %.2f GiB): text-to-image training never runs "
                "it (a YAML with an edit dataset keeps it).", count / 1e6, nbytes / 2**30)
    return count

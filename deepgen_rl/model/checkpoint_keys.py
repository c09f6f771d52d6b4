"""Key names of DeepGen checkpoints: normalise what real files contain, and write the reference layout.

Real ``.pth`` files vary (DESIGN.md section 8):
* wrappers add leading ``module.`` (DeepSpeed/DDP) or ``model.`` prefixes;
* Qwen2.5-VL keys moved between transformers versions. The reference (older transformers) writes
  ``lmm.visual.*`` and ``lmm.model.*``; current transformers names them ``lmm.model.visual.*`` and
  ``lmm.model.language_model.*``. We read both and write the reference layout.
* the pretraining checkpoint may carry a peft LoRA on the LLM (``...q_proj.lora_A[.default].weight``,
  ``...q_proj.base_layer.weight``); we merge it into the plain weights at load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

TOP_LEVEL_NAMES = ("lmm", "transformer", "vae", "connector", "projector_1", "projector_2", "projector_3",
                   "meta_queries", "ema")
WRAPPER_PREFIXES = ("module.", "model.")
# Keys the SFT .pth never carries: they come from the model paths (and EMA is not trained by RL).
OMITTED_PREFIXES = ("vae.", "lmm.", "ema.")

_LORA_A = re.compile(r"^(?P<base>.+)\.lora_A(?:\.(?P<adapter>[^.]+))?\.weight$")


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a loaded checkpoint (``{"state_dict": ...}``, ``{"module": ...}`` or flat)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "module", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError("checkpoint holds no tensors: expected a state dict, {'state_dict': ...} or {'module': ...}")


def strip_wrapper_prefixes(key: str) -> str:
    """``module.model.transformer.x`` -> ``transformer.x``; ``lmm.model.*`` (inside Qwen) is left alone."""
    while key.startswith(WRAPPER_PREFIXES) and not key.startswith(tuple(f"{n}." for n in TOP_LEVEL_NAMES)):
        key = key.split(".", 1)[1]
    return key


def qwen_key_to_current(key: str) -> str:
    """Reference Qwen2.5-VL layout -> current transformers layout (idempotent)."""
    if key.startswith("lmm.visual."):
        return "lmm.model.visual." + key[len("lmm.visual."):]
    if key.startswith("lmm.model.") and not key.startswith(("lmm.model.visual.", "lmm.model.language_model.")):
        return "lmm.model.language_model." + key[len("lmm.model."):]
    return key


def qwen_key_to_reference(key: str) -> str:
    """Current transformers Qwen2.5-VL layout -> the reference layout (idempotent)."""
    if key.startswith("lmm.model.visual."):
        return "lmm.visual." + key[len("lmm.model.visual."):]
    if key.startswith("lmm.model.language_model."):
        return "lmm.model." + key[len("lmm.model.language_model."):]
    return key


def normalize_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and move Qwen keys to the current transformers layout."""
    normalized: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = qwen_key_to_current(strip_wrapper_prefixes(key))
        if new_key in normalized:
            raise ValueError(f"checkpoint has two keys that both mean {new_key!r} (one of them is {key!r})")
        normalized[new_key] = value
    return normalized


def to_reference_keys(state_dict: Mapping[str, torch.Tensor], include_lmm: bool = False) -> dict[str, torch.Tensor]:
    """Model state dict -> the SFT ``.pth`` layout: reference key names, no ``vae.``/``ema.``, ``lmm.`` only if asked."""
    omitted = tuple(p for p in OMITTED_PREFIXES if not (include_lmm and p == "lmm."))
    return {qwen_key_to_reference(k): v for k, v in state_dict.items() if not k.startswith(omitted)}


def merge_lora_weights(state_dict: Mapping[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA pairs into their base weights: W + (alpha / r) B A. Drops the ``lora_*`` keys.

    ``base_layer.weight`` keys are renamed to plain ``weight``. Where the base weight itself is not in the
    checkpoint (it comes from the model path), the delta is kept under ``<base>.weight@lora_delta`` for the
    loader to add onto the loaded weight.
    """
    merged = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}
    for key, lora_a in state_dict.items():
        match = _LORA_A.match(key)
        if not match:
            continue
        adapter = f".{match['adapter']}" if match["adapter"] else ""
        lora_b = state_dict.get(f"{match['base']}.lora_B{adapter}.weight")
        if lora_b is None:
            raise ValueError(f"checkpoint has {key!r} but not its lora_B partner")
        rank = lora_a.shape[0]
        delta = (lora_alpha / rank) * (lora_b.float() @ lora_a.float())
        base_key = f"{match['base']}.weight"
        if base_key in merged:
            merged[base_key] = (merged[base_key].float() + delta).to(merged[base_key].dtype)
        else:
            merged[base_key + "@lora_delta"] = delta
    return merged

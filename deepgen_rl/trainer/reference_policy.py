"""The frozen reference policy of the KL term (docs/algorithms.md#kl-penalty): what the policy was before GRPO.

* Full fine-tuning: a frozen copy of the TRAINED modules only. It is made with ``copy.deepcopy`` whose memo
  maps every frozen module (LLM, VAE, ...) to itself, so the copy shares them instead of duplicating them
  (one extra DiT, not one extra DeepGen model). It must be built BEFORE ``deepspeed.initialize``: under ZeRO-3
  the engine partitions the live model's parameters, and the copy keeps whole tensors of its own.
* LoRA: the live model with its adapters disabled (no copy at all).

The reference conditioning: when only the DiT trains, the reference sees the prompt embeddings the rollout
recorded (the text side is frozen, so they are the reference's too); when the connector / LLM train, the
reference re-encodes the same prompt batch with its own frozen copies, once per step.

Shape legend: n samples in a chunk, C/h/w latent.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from deepgen_rl.sampling import Conditioning, encode_conditioning, guided_velocity

# Attributes of DeepGenModel that are not modules but must be shared, not copied, by the reference.
_SHARED_ATTRIBUTES = ("tokenizer", "scheduler")


class ReferencePolicy:
    """v_ref(x, sigma | c) of the frozen reference; all calls run under ``torch.no_grad()``."""

    def __init__(self, model: torch.nn.Module, *, lora_model: Optional[torch.nn.Module] = None,
                 owned: Sequence[str] = ()) -> None:
        self._model = model  # a frozen partial copy, or the live model (LoRA: adapters switched off per call)
        self._lora_model = lora_model
        self._owned = tuple(owned)  # attributes the copy owns; every other part is shared with the live model

    @classmethod
    def frozen_copy(cls, model: torch.nn.Module, trained_modules: Sequence[str]) -> "ReferencePolicy":
        """Copy ``trained_modules`` (attribute names, e.g. ``transformer``); share every other part."""
        memo: dict[int, object] = {}
        for name, child in model.named_children():
            if name not in trained_modules:
                memo[id(child)] = child
        for name, param in model.named_parameters(recurse=False):
            if name not in trained_modules:
                memo[id(param)] = param
        for name in _SHARED_ATTRIBUTES:
            value = getattr(model, name, None)
            if value is not None:
                memo[id(value)] = value
        reference = copy.deepcopy(model, memo)
        for name in trained_modules:
            part = getattr(reference, name)
            part.requires_grad_(False)
            if isinstance(part, torch.nn.Module):
                part.eval()
        return cls(reference, owned=trained_modules)

    @property
    def module(self) -> torch.nn.Module:
        """The model the policy runs (the partial copy, or the live model under LoRA)."""
        return self._model

    @classmethod
    def adapters_disabled(cls, model: torch.nn.Module) -> "ReferencePolicy":
        """LoRA: the reference is the base model, i.e. the live model with its DiT adapters off."""
        return cls(model, lora_model=model.transformer)

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "ReferencePolicy":
        """Move the frozen copy beside the policy (and to its compute dtype, e.g. after DeepSpeed's bf16 cast)."""
        for name in self._owned:  # never the shared parts: they belong to (and are placed by) the engine
            part = getattr(self._model, name)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.to(device=device, dtype=dtype)
            else:
                part.to(device=device, dtype=dtype)
        return self

    @contextlib.contextmanager
    def _active(self) -> Iterator[torch.nn.Module]:
        if self._lora_model is None:
            yield self._model
            return
        self._lora_model.disable_adapters()
        try:
            yield self._model
        finally:
            self._lora_model.enable_adapters()

    @torch.no_grad()
    def conditioning(self, prompts: Sequence[str], group_size: int, cfg_scale: float, edit=None) -> Conditioning:
        """Reference embeddings of the B unique ``prompts`` repeated G times (N rows), same batch composition
        (``edit``: the rollout's source conditioning, whose edit prompts are encoded as the policy's)."""
        with self._active() as model:
            return encode_conditioning(model, prompts, group_size, cfg_scale, edit)

    @torch.no_grad()
    def velocity(self, latents: Tensor, sigmas: Tensor, cond: Conditioning, cfg_scale: float) -> Tensor:
        """latents [n, C, h, w] fp32, sigmas [n] -> v_ref [n, C, h, w] fp32 (the same guidance as the policy)."""
        with self._active() as model:
            # The weight dtype read from one parameter (model.dtype walks every submodule in diffusers).
            dtype = next(model.transformer.parameters()).dtype
            return guided_velocity(model, latents, sigmas, cond, cfg_scale, model_dtype=dtype)

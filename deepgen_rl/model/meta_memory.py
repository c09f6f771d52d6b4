"""Activation memory of the real-size ``meta`` model, measured with torch's MemTracker (no memory is used).

Meta tensors have shapes and no data, so a forward (and backward) on them allocates nothing, while the tracker
records the bytes every live tensor WOULD occupy. The meta device has no fused attention kernel: its
``scaled_dot_product_attention`` takes the math path and materialises [n, heads, S, S] scores that a GPU's
flash / memory-efficient kernels never hold. :func:`gpu_attention_kernel` routes it to the memory-efficient
kernel's own meta implementation for the duration of a measurement.

Shape legend: n samples, S_img / S_txt image / text tokens, D DiT width, C/h/w latent.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

_MATH_SDPA = F.scaled_dot_product_attention


def _memory_efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False):
    if attn_mask is not None or enable_gqa:  # not on the DiT / VAE paths measured here
        return _MATH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, None, query.requires_grad, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention_kernel() -> Iterator[None]:
    """Within: ``F.scaled_dot_product_attention`` runs the memory-efficient kernel (its meta implementation)."""
    with mock.patch.object(F, "scaled_dot_product_attention", _memory_efficient_sdpa):
        yield


def measured_activation_peak(run: Callable[[], object], module: nn.Module) -> int:
    """Bytes of activations, temporaries and inputs alive at the peak of ``run()``, which calls ``module``.

    Parameters, buffers, gradients and optimizer states are left out (the estimator counts them itself).
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for param in frozen:  # the tracker hooks every parameter's gradient; under no_grad none is ever made
        param.requires_grad_(True)
    try:
        with tracker, gpu_attention_kernel():
            run()
    finally:
        for param in frozen:
            param.requires_grad_(False)
    kinds = (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH)
    return max(sum(stats.get(kind, 0) for kind in kinds) for stats in tracker.get_tracker_snapshot("peak").values())


def decode_peak_bytes(model: nn.Module, n: int, latent: tuple[int, int, int]) -> int:
    """Peak of ``model.decode_latents`` on n latents [n, C, h, w] (the trainer decodes micro-batch by micro-batch)."""
    latents = torch.empty((n, *latent), device="meta", dtype=torch.float32)
    return measured_activation_peak(lambda: model.decode_latents(latents), model.vae)


@functools.lru_cache(maxsize=64)
def block_peak_bytes(block: nn.Module, n: int, image_tokens: int, text_tokens: int, train: bool) -> int:
    """Peak of one SD3 joint block on hidden [n, S_img, D], context [n, S_txt, D], temb [n, D]: forward +
    backward of the sum of its outputs when ``train`` (weights trainable), else a no_grad forward."""
    weight = next(block.parameters())
    width, dtype = weight.shape[-1], weight.dtype

    def run() -> None:
        with torch.set_grad_enabled(train):
            inputs = [torch.empty(n, tokens, width, device="meta", dtype=dtype, requires_grad=train)
                      for tokens in (image_tokens, text_tokens)]
            temb = torch.empty(n, width, device="meta", dtype=dtype, requires_grad=train)
            outputs = block(inputs[0], inputs[1], temb)
            if train:
                sum(o.float().sum() for o in outputs if o is not None).backward()

    return measured_activation_peak(run, block)


def distinct_blocks(transformer: nn.Module) -> list[nn.Module]:
    """One SD3 joint block of each kind: the first (dual attention in SD3.5), the first plain one, the last
    (context_pre_only)."""
    blocks = list(transformer.transformer_blocks)
    plain = next((b for b in blocks if not getattr(b, "use_dual_attention", False)), blocks[0])
    return list({id(b): b for b in (blocks[0], plain, blocks[-1])}.values())

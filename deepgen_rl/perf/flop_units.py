"""FLOP units of the DeepGen model, counted by torch's ``FlopCounterMode`` on the model's own forward functions.

Each unit is ONE row (one image, or one text) at the run's shapes; a GRPO step's FLOPs are these units times the
counts its flags give (step_flops.py). The model is a ``meta`` one (model/meta.py, or ``meta_copy`` of a live
model), so nothing is computed: the counter reads the shapes of every matmul, convolution and attention call.
FlopCounterMode counts those (2 x m x n x k per matmul; attention as its two matmuls) and no elementwise op
(norms, activations, softmax, the optimizer), the usual MFU convention.

Backward is counted too: the trained parameters get ``requires_grad`` (``set_trainable`` as the trainer does) and a
scalar of the output is back-propagated under the counter; with gradient checkpointing the recompute inside the
backward is counted as well, and told apart from the backward proper by a second backward without checkpointing.

Shape legend: C/h/w latent, H/W image, L text tokens (prompt + meta queries), D_joint / D_pooled DiT text widths.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

META = torch.device("meta")


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of the matmuls / convolutions / attention calls ``run()`` makes (FlopCounterMode's total)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class TrainFlops:
    """One row through a trained module: forward with gradients, the checkpointed recompute inside the backward
    (0 without gradient checkpointing) and the backward proper."""

    forward: int
    recompute: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.recompute + self.backward


@dataclass(frozen=True)
class FlopUnits:
    """FLOPs of one row (image or text) through each part, at one run's shapes.

    dit_forward: a no-grad DiT forward of one image (rollout, reference, old policy); dit_train: one image with
    gradients (a training chunk's row); text_forward: one chat text (``prompt_tokens`` + meta queries) through the
    LLM, connector and projectors without gradients; text_train: the same with gradients (zeros unless the text
    side trains); vae_decode / vae_encode: one image; trained_params: parameters with ``requires_grad``.
    dit_reference_forward: the reference policy's forward (under LoRA the live model with its adapters off)."""

    dit_forward: int
    dit_train: TrainFlops
    dit_reference_forward: int  # the KL reference's forward: dit_forward, or under LoRA with the adapters off
    text_forward: int
    text_train: TrainFlops
    vae_decode: int
    vae_encode: int
    trained_params: int
    text_tokens: int


class _FixedLengthTokens:
    """Stands in for the tokenizer while counting: every text is ``length`` tokens (ids 0), none padded."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, texts, **_kwargs):
        from types import SimpleNamespace

        ids = torch.zeros((len(texts), self.length), dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


@contextlib.contextmanager
def _prompt_length(model: nn.Module, tokens: int) -> Iterator[None]:
    tokenizer = model.tokenizer
    model.tokenizer = _FixedLengthTokens(tokens)
    try:
        yield
    finally:
        model.tokenizer = tokenizer


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing of the DiT, connector and (when it trains) LLM on or off, restored after."""
    transformer, connector, lmm = model.transformer, model.connector, model.lmm
    before = (transformer.gradient_checkpointing, connector.gradient_checkpointing, _llm_checkpointing(lmm))
    if enabled:
        model.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
        connector.gradient_checkpointing = False
        if before[2]:
            lmm.gradient_checkpointing_disable()
    try:
        yield
    finally:
        if before[0]:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()
        connector.gradient_checkpointing = before[1]
        if before[2] and not _llm_checkpointing(lmm):
            lmm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif not before[2] and _llm_checkpointing(lmm):
            lmm.gradient_checkpointing_disable()


@contextlib.contextmanager
def _adapters_off(transformer: nn.Module) -> Iterator[None]:
    """Within: the DiT's LoRA adapters disabled, as the LoRA reference runs it (nothing to do without adapters)."""
    if not getattr(transformer, "_hf_peft_config_loaded", False):
        yield
        return
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _llm_checkpointing(lmm: nn.Module) -> bool:
    """Whether the LLM checkpoints (transformers renamed the property; a stand-in LLM may have neither)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lmm), name):
            return bool(getattr(lmm, name))
    return False


def train_flops(forward: Callable[[], torch.Tensor], parameters: Iterable[nn.Parameter],
                checkpointing: Optional[Callable[[bool], ContextManager]] = None) -> TrainFlops:
    """Forward with gradients, then the backward of a scalar of its output, counted apart. ``checkpointing(on)``:
    a context that switches gradient checkpointing on / off; given, the forward-backward runs twice (without,
    then with) so that the recompute is told apart from the backward proper. ``parameters``: their .grad is
    cleared after."""

    def forward_backward(enabled: bool) -> tuple[int, int]:
        with checkpointing(enabled) if checkpointing is not None else contextlib.nullcontext():
            counter = FlopCounterMode(display=False)
            with counter:
                out = forward()
            forward_flops = int(counter.get_total_flops())
            loss = out.float().sum()
            counter = FlopCounterMode(display=False)
            with counter:
                loss.backward()
            return forward_flops, int(counter.get_total_flops())

    forward_flops, backward_flops = forward_backward(False)
    recompute = 0
    if checkpointing is not None:
        _, with_recompute = forward_backward(True)
        recompute = with_recompute - backward_flops
    for param in parameters:
        param.grad = None
    return TrainFlops(forward=forward_flops, recompute=recompute, backward=backward_flops)


def _dit_inputs(model: nn.Module, height: int, width: int, text_tokens: int):
    from deepgen_rl.sampling.trajectory import Conditioning

    config = model.transformer.config
    dtype = next(model.transformer.parameters()).dtype
    latents = torch.empty((1, *model.latent_shape(height, width)), device=META, dtype=torch.float32)
    sigma = torch.empty(1, device=META, dtype=torch.float32)
    cond = Conditioning(prompt_embeds=torch.empty(1, text_tokens, config.joint_attention_dim, device=META, dtype=dtype),
                        pooled=torch.empty(1, config.pooled_projection_dim, device=META, dtype=dtype))
    return latents, sigma, cond


def measure_units(model: nn.Module, *, height: int, width: int, prompt_tokens: int,
                  gradient_checkpointing: bool) -> FlopUnits:
    """The FLOP units of ``model`` (on ``meta``, trainable parameters already marked) at one run's shapes.

    The DiT rows go through ``guided_velocity`` (what rollout, training and the reference call) without CFG: one
    row per CFG branch (step_flops.py doubles them under CFG). The text through the model's own forward
    (LLM -> fusion layers -> connector -> projectors) with a stand-in tokenizer of exactly ``prompt_tokens``
    tokens; the VAE through ``decode_latents`` / ``encode_images``.
    """
    from deepgen_rl.sampling.rollout import guided_velocity

    if next(model.parameters()).device != META:
        raise ValueError("measure_units counts on a meta model (model/meta.py or perf.flop_units.meta_copy)")
    text_tokens = prompt_tokens + model.num_queries
    latents, sigma, cond = _dit_inputs(model, height, width, text_tokens)
    was_training = model.training
    dtype = next(model.transformer.parameters()).dtype
    try:
        model.eval()
        with torch.no_grad():
            dit_forward = count_flops(lambda: guided_velocity(model, latents, sigma, cond, 0.0))
            with _adapters_off(model.transformer):
                dit_reference_forward = count_flops(lambda: guided_velocity(model, latents, sigma, cond, 0.0))
            with _prompt_length(model, prompt_tokens):
                text_forward = count_flops(lambda: model(["text"]))
            vae_decode = count_flops(lambda: model.decode_latents(latents))
            images = torch.empty((1, 3, height, width), device=META, dtype=dtype)
            vae_encode = count_flops(lambda: model.encode_images(images))
        model.train()
        switch = (lambda on: _checkpointing(model, on)) if gradient_checkpointing else None
        dit_train = train_flops(lambda: guided_velocity(model, latents, sigma, cond, 0.0), model.parameters(),
                                switch)
        text_train = TrainFlops(0, 0, 0)
        text_params = [p for name in ("lmm", "connector", "projector_1", "projector_2", "projector_3")
                       for p in getattr(model, name).parameters()] + [model.meta_queries]
        if any(p.requires_grad for p in text_params):
            with _prompt_length(model, prompt_tokens):
                text_train = train_flops(lambda: model(["text"])[0], model.parameters(), switch)
    finally:
        model.train(was_training)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FlopUnits(dit_forward=dit_forward, dit_train=dit_train, dit_reference_forward=dit_reference_forward,
                     text_forward=text_forward, text_train=text_train,
                     vae_decode=vae_decode, vae_encode=vae_encode, trained_params=trained, text_tokens=text_tokens)


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are ``meta`` tensors of the same shapes, dtypes
    and ``requires_grad`` (no weight is copied: what a live model costs to count is a few MB of Python objects).
    The LLM's attention runs eagerly in the copy (the meta device cannot run the sdpa path's mask check; the same
    matmuls are counted)."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        # A parameter already partitioned by ZeRO-3 (built under zero.Init) holds an empty tensor; ds_shape is its own.
        empty = torch.empty(getattr(tensor, "ds_shape", tensor.shape), dtype=tensor.dtype, device=META)
        memo[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else empty)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    clone = copy.deepcopy(model, memo)
    use_eager_attention(clone)
    return clone


def use_eager_attention(model: nn.Module) -> None:
    """Every transformers config inside ``model`` (and its text / vision sub-configs) set to eager attention."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                try:
                    cfg._attn_implementation = "eager"
                except (AttributeError, ValueError):  # a frozen / non-transformers config: nothing to switch
                    pass

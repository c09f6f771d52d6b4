"""Lean memory (issue 10, item 3): VAE decode in its own micro-batch, no vision tower in text-to-image training,
and a loader that builds the joint parts in the target dtype on the target device.

Memory is measured with torch's profiler (``profile_memory=True``): it records every allocation and free of the
CPU allocator, so the running sum of its ``[memory]`` events is the live tensor bytes, and its maximum the peak.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from deepgen_rl.config import GRPOConfig
from deepgen_rl.model import loading
from deepgen_rl.model.vision_tower import drop_vision_tower
from deepgen_rl.sampling.rollout import decode_images, generate_images

DECODE_IMAGES = 32  # the guide's rollout micro-batch
DECODE_SIZE = 128  # pixels: 16x16 latents, so the decoder's activations dominate the measurement


@pytest.fixture(scope="module")
def tiny_model():
    from deepgen_rl.model.tiny import build_tiny_deepgen

    return build_tiny_deepgen(seed=0)


def peak_live_bytes(fn) -> tuple[int, object]:
    """Peak live CPU tensor bytes allocated while ``fn()`` runs (relative to its start) and its result."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def test_decode_peak_falls_with_the_decode_micro_batch(tiny_model):
    channels, height, width = tiny_model.latent_shape(DECODE_SIZE, DECODE_SIZE)
    latents = torch.randn(DECODE_IMAGES, channels, height, width, generator=torch.Generator().manual_seed(0))
    peak_all, images_all = peak_live_bytes(lambda: decode_images(tiny_model, latents, DECODE_IMAGES))
    peak_micro, images_micro = peak_live_bytes(lambda: decode_images(tiny_model, latents, 4))
    # The output itself ([32, 3, 128, 128] fp32, plus its chunks before the concatenation) is a floor both share.
    output_bytes = images_all.numel() * images_all.element_size()
    assert peak_all > 4 * output_bytes, "the measurement must be dominated by decoder activations"
    ratio = peak_micro / peak_all
    print(f"decode peak, 4 vs 32 images per decode: {peak_micro / 2**20:.1f} / {peak_all / 2**20:.1f} MiB "
          f"= {ratio:.3f}")
    assert ratio < 0.35
    # Micro-batching changes how much is alive at once, never the pixels.
    torch.testing.assert_close(images_micro, images_all, rtol=0, atol=1e-6)


def _decoder_batch_sizes(model) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.vae.decoder.register_forward_pre_hook(lambda _module, inputs: sizes.append(inputs[0].shape[0]))
    return sizes, handle


def test_eval_generation_decodes_in_its_own_micro_batch(tiny_model):
    sizes, handle = _decoder_batch_sizes(tiny_model)
    try:
        generate_images(tiny_model, ["a", "b", "c", "d", "e"], num_inference_steps=2, height=64, width=64,
                        cfg_scale=0.0, generator=torch.Generator().manual_seed(0), micro_batch_size=5,
                        decode_micro_batch_size=2)
    finally:
        handle.remove()
    assert sizes == [2, 2, 1]


def test_trainer_decode_phase_uses_the_flag(tiny_model):
    from deepgen_rl.trainer.grpo_trainer import DeepGenGRPOTrainer, RolloutBatch

    latents = torch.randn(6, 3, *tiny_model.latent_shape(64, 64))  # [N, T + 1, C, h, w]
    trainer = SimpleNamespace(model=tiny_model, args=SimpleNamespace(vae_decode_micro_batch_size=4,
                                                                     rollout_micro_batch_size=32, rollout_n=2))
    trajectory = SimpleNamespace(latents=latents, num_samples=6, final_latents=latents[:, -1],
                                 release_final=lambda: None)
    batch = RolloutBatch(samples=[], trajectory=trajectory)
    sizes, handle = _decoder_batch_sizes(tiny_model)
    try:
        DeepGenGRPOTrainer.decode_phase(trainer, batch)
    finally:
        handle.remove()
    assert sizes == [4, 2] and batch.images.shape == (6, 3, 64, 64)


def test_decode_micro_batch_flag_default_and_validation(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path))
    assert config.vae_decode_micro_batch_size == 8 < config.rollout_micro_batch_size
    with pytest.raises(ValueError, match="--vae_decode_micro_batch_size"):
        GRPOConfig(output_dir=str(tmp_path), vae_decode_micro_batch_size=0)


# ---------------------------------------------------------------- the vision tower


def test_vision_tower_is_dropped_and_text_encoding_unchanged(tiny_model_args):
    model = loading.load_deepgen_model(tiny_model_args)
    model.set_trainable("dit_connector_llm")
    tower_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("lmm.model.visual."))
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model.encode_prompt(["a red apple", "two pandas"])
    assert drop_vision_tower(model) == tower_params > 0
    assert model.lmm.model.visual is None
    assert sum(p.numel() for p in model.parameters()) == total - tower_params
    assert not any(".visual." in key for key in model.state_dict())
    with torch.no_grad():
        after = model.encode_prompt(["a red apple", "two pandas"])
    for ours, theirs in zip(after, before):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert drop_vision_tower(model) == 0


def test_a_trainable_vision_tower_is_refused(tiny_model_args):
    model = loading.load_deepgen_model(tiny_model_args)
    model.lmm.model.visual.requires_grad_(True)
    with pytest.raises(RuntimeError, match="vision tower"):
        drop_vision_tower(model)


# ---------------------------------------------------------------- the loader's host memory


class TensorRecorder(TorchDispatchMode):
    """Device, dtype and size of every tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.device, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.outputs.append((str(func), leaf.device, leaf.dtype, leaf.numel()))
        return out


def test_loader_builds_the_joint_parts_in_dtype_on_the_device(tiny_model_args, monkeypatch):
    """The meta device stands in for a GPU: nothing of the joint parts may be created on the host, nor in fp32."""
    recorder = TensorRecorder()
    real_class = loading.DeepGenModel

    def recorded(*args, **kwargs):
        with recorder:
            return real_class(*args, **kwargs)

    monkeypatch.setattr(loading, "DeepGenModel", recorded)
    args = dataclasses.replace(tiny_model_args, checkpoint="")  # weights would only be copied into meta tensors
    model = loading.load_deepgen_model(args, dtype=torch.bfloat16, device="meta")
    floating = [out for out in recorder.outputs if out[2].is_floating_point]
    own_params = sum(p.numel() for name, p in model.named_parameters()
                     if name.startswith(("connector.", "projector_", "meta_queries")))
    assert sum(numel for *_, numel in floating) >= own_params  # the recorder saw the parts being created
    on_host = [out for out in floating if out[1].type != "meta" or out[2] != torch.bfloat16]
    assert on_host == []
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored after the build

"""The edit (Kontext) conditioning path on the tiny model: source images through the Qwen2.5-VL vision tower and,
as VAE latents, through the DiT as extra masked tokens; text-to-image untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from deepgen_rl.model.kontext import MaskedJointAttnProcessor, SD3Transformer2DKontextModel, pack_reference_tokens
from deepgen_rl.model.prompt_format import edit_chat_text
from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
from deepgen_rl.model.vision_inputs import expand_image_pads, prepare_vision_inputs
from tests.tolerances import assert_close_up_to_reordering, reordering_tolerance

# The tiny DiT's sequential reductions (tests/tolerances.py): per block about 10 (adaLN, two norms, q/k/v, scores,
# softmax, attention x V, out projection, two feed-forward matmuls), 2 blocks, plus ~7 in the embedders and the
# output head; the longest sums 128 terms (the feed-forward's inner width, 4 x 32).
TINY_DIT_REDUCTIONS = {"reductions": 30, "longest": 128}


@pytest.fixture(scope="module")
def model():
    return build_tiny_deepgen(seed=0)


def _images(seed: int, *sizes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=generator) for size in sizes]


def _target(model, rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    return torch.randn(rows, *shape, generator=generator), torch.full((rows,), 0.7)


@torch.no_grad()
def _edit_velocity(model, sources: list[list[torch.Tensor]], llm_sources=None) -> torch.Tensor:
    """Velocity of one fixed target per row, edited with ``sources`` (the LLM sees ``llm_sources`` if given)."""
    embeds, pooled = model.encode_edit_prompt(["make the sky red"] * len(sources), llm_sources or sources)
    references = [model.encode_reference_images(row) for row in sources]
    latents, sigmas = _target(model, len(sources))
    return model.predict_velocity(latents, sigmas, embeds, pooled, reference_latents=references)


def test_edit_velocity_has_the_target_shape_and_depends_on_the_source(model):
    source, other = _images(0, 64), _images(1, 64)
    velocity = _edit_velocity(model, [source])
    assert velocity.shape == _target(model, 1)[0].shape
    # Each path on its own carries the source: the DiT's reference tokens, and the LLM's vision tokens.
    assert not torch.allclose(velocity, _edit_velocity(model, [other], llm_sources=[source]), atol=1e-4)
    assert not torch.allclose(velocity, _edit_velocity(model, [source], llm_sources=[other]), atol=1e-4)


@torch.no_grad()
def test_padding_of_a_second_reference_does_not_change_the_velocity(model):
    """Row 0 has two references (64 and 32 px: 16 + 4 tokens); next to a row with two 64 px references it is
    padded by 12 tokens. Its velocity matches the unpadded one, whatever the padding holds; unmasked it does not."""
    dit = model.transformer
    embeds, pooled = model.encode_edit_prompt(["swap the colours"] * 2, [_images(0, 64, 32), _images(2, 64, 64)])
    row0 = [model.encode_reference_images(_images(0, 64, 32))]
    row1 = model.encode_reference_images(_images(2, 64, 64))
    latents, sigmas = _target(model, 2)
    alone = model.predict_velocity(latents[:1], sigmas[:1], embeds[:1], pooled[:1], reference_latents=row0)
    batched = model.predict_velocity(latents, sigmas, embeds, pooled, reference_latents=row0 + [row1])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)

    tokens, mask = pack_reference_tokens(dit.embed_references(row0 + [row1], torch.float32))
    assert mask.sum(dim=1).tolist() == [20, 32]
    noisy = tokens.clone()
    noisy[0, 20:] = torch.randn(12, tokens.shape[-1]) * 10
    args = (latents, embeds, pooled, sigmas * 1000)
    padded_noise = dit.forward_with_reference_tokens(*args, noisy, mask)
    torch.testing.assert_close(padded_noise[:1], alone, atol=1e-5, rtol=1e-5)
    unmasked = dit.forward_with_reference_tokens(*args, noisy, torch.ones_like(mask))
    assert not torch.allclose(unmasked[:1], alone, atol=1e-3)


@torch.no_grad()
def test_text_to_image_velocity_is_the_plain_sd3_dits(model):
    plain = SD3Transformer2DModel.from_config(model.transformer.config)
    plain.load_state_dict(model.transformer.state_dict())
    embeds, pooled = model.encode_prompt(["a red apple", "a blue car"])
    latents, sigmas = _target(model, 2)
    _edit_velocity(model, [_images(0, 64)])  # the masked processor is installed by now
    assert isinstance(model.transformer.transformer_blocks[0].attn.processor, MaskedJointAttnProcessor)
    assert isinstance(plain.transformer_blocks[0].attn.processor, JointAttnProcessor2_0)
    ours = model.predict_velocity(latents, sigmas, embeds, pooled)
    theirs = plain(hidden_states=latents, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                   pooled_projections=pooled, return_dict=False)[0]
    # Two instances: equal up to the order of their sums (tests/tolerances.py), not bit for bit.
    assert_close_up_to_reordering(ours, theirs, **TINY_DIT_REDUCTIONS)


def test_image_pads_expand_to_the_vision_tower_token_counts(model):
    texts = [edit_chat_text("add a hat", 2), edit_chat_text("remove it", 1)]
    vision = prepare_vision_inputs(model.lmm.config.vision_config, texts, [_images(0, 64, 96), _images(1, 64)])
    merge = model.lmm.config.vision_config.spatial_merge_size
    per_image = (vision.image_grid_thw.prod(-1) // merge ** 2).tolist()
    pads = [text.count("<|image_pad|>") for text in vision.texts]
    assert pads == [per_image[0] + per_image[1], per_image[2]] and min(per_image) > 1
    with pytest.raises(ValueError, match="2 image placeholders for 1 source images"):
        expand_image_pads(texts[0], [4])


def test_edit_prompt_without_the_vision_tower_is_refused(model):
    saved, model.lmm.model.visual = model.lmm.model.visual, None
    try:
        with pytest.raises(RuntimeError, match="vision tower"):
            model.encode_edit_prompt(["make it blue"], [_images(0, 64)])
    finally:
        model.lmm.model.visual = saved


def test_edit_pth_with_kontext_names_loads(tiny_model_args, tmp_path):
    """The tiny SD3 folder is written as UniPic2's (``SD3Transformer2DKontextModel``); a .pth holding another
    Kontext DiT's weights loads into it, and the loaded DiT's edit forward is that DiT's."""
    from deepgen_rl.model.checkpoint_keys import to_reference_keys
    from deepgen_rl.model.loading import load_deepgen_model

    config_file = Path(tiny_model_args.sd3_model_name_or_path) / "transformer" / "config.json"
    assert json.loads(config_file.read_text())["_class_name"] == "SD3Transformer2DKontextModel"
    source = build_tiny_deepgen(seed=3)
    pth = tmp_path / "edit.pth"
    torch.save({"state_dict": to_reference_keys(source.state_dict())}, pth)
    tiny_model_args.checkpoint = str(pth)
    loaded = load_deepgen_model(tiny_model_args)
    assert isinstance(loaded.transformer, SD3Transformer2DKontextModel)
    latents, sigmas = _target(loaded, 2)
    embeds, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    references = [[torch.randn(16, 8, 8)], [torch.randn(16, 4, 4), torch.randn(16, 2, 6)]]
    with torch.no_grad():
        ours, theirs = (m.predict_velocity(latents, sigmas, embeds, pooled, reference_latents=references)
                        for m in (loaded, source))
        base = build_tiny_deepgen(seed=0).predict_velocity(latents, sigmas, embeds, pooled, reference_latents=references)
    # Two instances: equal up to the order of their sums (tests/tolerances.py), not bit for bit (it failed with
    # OMP_NUM_THREADS=2 on a 2-core AMD EPYC); another DiT's weights are far outside that tolerance.
    assert_close_up_to_reordering(ours, theirs, **TINY_DIT_REDUCTIONS)
    assert (base - theirs).abs().max() > 100 * reordering_tolerance(**TINY_DIT_REDUCTIONS) * theirs.abs().max()


@torch.no_grad()
def test_unpadded_edit_forward_equals_diffusers_blocks_on_the_joined_tokens(model):
    """Without padding, the Kontext forward is diffusers' own SD3 blocks (its unmasked processor) run on
    [target tokens, reference tokens], read back at the target tokens: checks our masked processor and unpatchify."""
    plain = SD3Transformer2DModel.from_config(model.transformer.config)
    plain.load_state_dict(model.transformer.state_dict())
    latents, sigmas = _target(model, 2)
    embeds, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    references = [[torch.randn(16, 4, 6), torch.randn(16, 8, 8)], [torch.randn(16, 6, 4), torch.randn(16, 8, 8)]]
    ours = model.predict_velocity(latents, sigmas, embeds, pooled, reference_latents=references)

    target = plain.pos_embed(latents)  # [2, 16, D]
    refs = torch.stack([torch.cat([plain.pos_embed(r[None])[0] for r in row]) for row in references])  # [2, 22, D]
    tokens, temb = torch.cat([target, refs], 1), plain.time_text_embed(sigmas * 1000, pooled)
    context = plain.context_embedder(embeds)
    for block in plain.transformer_blocks:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    out = plain.proj_out(plain.norm_out(tokens[:, :16], temb))  # [2, 16 patches, 2*2*16]
    expected = out.reshape(2, 4, 4, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(2, 16, 8, 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

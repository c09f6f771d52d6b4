"""The joint model and its loader: tiny parts round-trip through the real loading code; reference keys load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepgen_rl.model import CheckpointError, ModelPathError, load_deepgen_model
from deepgen_rl.model.checkpoint_keys import (
    normalize_checkpoint_keys,
    qwen_key_to_current,
    qwen_key_to_reference,
    split_lora,
    to_reference_keys,
)
from deepgen_rl.model.deepgen import fusion_layer_indices
from deepgen_rl.model.tiny import build_tiny_deepgen
from tests.tolerances import assert_close_up_to_reordering

PROMPTS = ["a red apple", 'a shop sign that says "OPEN"', "two pandas", "the quick brown fox jumps over the lazy dog"]


def _outputs(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = model.latent_shape(64, 64)
    latents = torch.randn(len(PROMPTS), channels, height, width, generator=generator)
    with torch.no_grad():
        embeds, pooled = model.encode_prompt(PROMPTS)
        velocity = model.predict_velocity(latents, torch.linspace(0.2, 0.9, len(PROMPTS)), embeds, pooled)
        images = model.decode_latents(latents)
    return embeds, pooled, velocity, images


def test_saved_tiny_model_loads_back_identically(tiny_model_args):
    reference = build_tiny_deepgen(seed=0)
    loaded = load_deepgen_model(tiny_model_args)
    # Two instances: equal up to the order of their float32 sums (tests/tolerances.py), not bit for bit. Velocity
    # and images follow the prompt encoding: Qwen's 8 layers and the connector's 2 (~90 sequential reductions) then
    # the DiT (~30); the longest sum is the VAE's first convolution, 16 channels x 3 x 3 = 144 terms.
    for ours, theirs in zip(_outputs(loaded), _outputs(reference)):
        assert_close_up_to_reordering(ours, theirs, reductions=120, longest=144)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_joint_forward_shapes(tiny_model_args):
    model = load_deepgen_model(tiny_model_args)
    embeds, pooled, velocity, images = _outputs(model)
    assert embeds.shape[0] == 4 and embeds.shape[2] == model.transformer.config.joint_attention_dim
    assert embeds.shape[1] > model.num_queries  # prompt tokens + queries
    assert pooled.shape == (4, model.transformer.config.pooled_projection_dim)
    assert velocity.shape == (4, *model.latent_shape(64, 64))
    assert images.shape == (4, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_prompt_template_reaches_the_tokenizer(tiny_model_args):
    model = load_deepgen_model(tiny_model_args)
    seen: list[list[str]] = []
    tokenizer = model.tokenizer

    class Recorder:
        def __call__(self, texts, **kwargs):
            seen.append(list(texts))
            return tokenizer(texts, **kwargs)

    model.tokenizer = Recorder()
    with torch.no_grad():
        model.encode_prompt(["a cat"])
        model.encode_prompt_and_negative(["a cat"])
    # Each call tokenizes the chat texts twice: to count them against --max_prompt_length, then to encode; the
    # CFG negative (the empty prompt in the same template) is encoded in the prompts' batch.
    cat = "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n"
    negative = "<|im_start|>user\nGenerate an image: <|im_end|>\n<|im_start|>assistant\n"
    assert seen == [[cat], [cat], [cat], [cat, negative]]


def test_fusion_layers_of_the_real_model():
    # Qwen2.5-VL-3B has 36 decoder layers: hidden states 35, 29, 23, 17, 11, 5.
    assert fusion_layer_indices(36, 6) == [35, 29, 23, 17, 11, 5]
    assert fusion_layer_indices(8, 2) == [7, 1]
    with pytest.raises(ValueError, match="--num_fusion_layers"):
        fusion_layer_indices(8, 3)


def test_gradient_reaches_llm_only_when_trainable(tiny_model_args):
    model = load_deepgen_model(tiny_model_args)

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        embeds, pooled = model.encode_prompt(PROMPTS[:2])
        latents = torch.randn(2, *model.latent_shape(64, 64))
        model.predict_velocity(latents, torch.tensor([0.3, 0.7]), embeds, pooled).square().mean().backward()

    model.set_trainable("dit_connector_llm")
    backward()
    llm_grads = [p.grad for n, p in model.lmm.named_parameters() if "language_model.layers" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in llm_grads)
    assert model.connector.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0

    model.set_trainable("dit")
    backward()
    assert all(p.grad is None for p in model.lmm.parameters())
    assert all(p.grad is None for p in model.connector.parameters())
    assert model.transformer.proj_out.weight.grad.abs().sum() > 0


# ----- reference checkpoints -----

def _reference_style_checkpoint(model) -> dict[str, torch.Tensor]:
    """The tiny model's weights as a real DeepGen .pth looks: reference names, some with wrapper prefixes,
    plus a few LLM keys in the old Qwen layout (as a pretraining .pth with LLM weights carries)."""
    state = to_reference_keys(model.state_dict())
    messy = {}
    for index, (key, value) in enumerate(sorted(state.items())):
        messy[("module." if index % 3 == 0 else "") + key] = value + 0.01  # shifted so loading is observable
    lm_key = "model.language_model.layers.0.mlp.up_proj.weight"
    messy["module.lmm.model.layers.0.mlp.up_proj.weight"] = model.lmm.state_dict()[lm_key] + 0.5
    messy["lmm.visual.blocks.0.norm1.weight"] = model.lmm.state_dict()["model.visual.blocks.0.norm1.weight"] + 0.5
    return messy


def test_reference_keys_with_prefixes_and_old_qwen_layout_load(tiny_model_args, tmp_path):
    source = build_tiny_deepgen(seed=0)
    checkpoint = _reference_style_checkpoint(source)
    assert any(k.startswith("module.transformer.") for k in checkpoint)
    path = tmp_path / "reference_style.pth"
    torch.save({"state_dict": checkpoint}, path)

    for trainable in ("dit", "dit_connector"):
        args = dataclasses.replace(tiny_model_args, checkpoint=str(path), trainable_modules=trainable)
        model = load_deepgen_model(args)  # raises if a trainable key were missing
        own = model.state_dict()
        for key, value in checkpoint.items():
            if key.startswith("module.lmm.") or key.startswith("lmm."):
                continue
            torch.testing.assert_close(own[key.removeprefix("module.")], value, rtol=0, atol=0)
        torch.testing.assert_close(own["lmm.model.language_model.layers.0.mlp.up_proj.weight"],
                                   checkpoint["module.lmm.model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(own["lmm.model.visual.blocks.0.norm1.weight"],
                                   checkpoint["lmm.visual.blocks.0.norm1.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("trainable, dropped", [
    ("dit", "transformer.transformer_blocks.0.attn.to_q.weight"),
    ("dit_connector", "connector.layers.1.mlp.fc2.bias"),
    ("dit_connector", "meta_queries"),
])
def test_checkpoint_missing_a_trainable_key_names_it(tiny_model_args, tmp_path, trainable, dropped):
    state = to_reference_keys(build_tiny_deepgen(seed=0).state_dict())
    del state[dropped]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    args = dataclasses.replace(tiny_model_args, checkpoint=str(path), trainable_modules=trainable)
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        load_deepgen_model(args)


def test_checkpoint_of_another_connector_size_names_the_flags(tiny_model_args):
    args = dataclasses.replace(tiny_model_args, connector_intermediate_size=48)
    with pytest.raises(CheckpointError, match="--connector_"):
        load_deepgen_model(args)


@pytest.mark.parametrize("field, env_name", [
    ("sd3_model_name_or_path", "SD3_5_MODEL_NAME_OR_PATH"),
    ("qwen2_5_vl_model_name_or_path", "QWEN2_5_VL_MODEL_NAME_OR_PATH"),
    ("checkpoint", "CHECKPOINT"),
])
def test_wrong_model_path_names_its_env_variable(tiny_model_args, tmp_path, field, env_name):
    args = dataclasses.replace(tiny_model_args, **{field: str(tmp_path / "does_not_exist")})
    with pytest.raises(ModelPathError, match=env_name):
        load_deepgen_model(args)


def test_unset_or_incomplete_sd3_path_is_explained(tiny_model_args, tmp_path):
    with pytest.raises(ModelPathError, match="SD3_5_MODEL_NAME_OR_PATH is not set"):
        load_deepgen_model(dataclasses.replace(tiny_model_args, sd3_model_name_or_path=""))
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelPathError, match=r"missing .*vae/config\.json"):
        load_deepgen_model(dataclasses.replace(tiny_model_args, sd3_model_name_or_path=str(tmp_path)))


# ----- key mapping, by hand -----

def test_qwen_key_moves_both_ways():
    pairs = [
        ("lmm.visual.blocks.0.attn.qkv.weight", "lmm.model.visual.blocks.0.attn.qkv.weight"),
        ("lmm.model.layers.3.self_attn.q_proj.weight", "lmm.model.language_model.layers.3.self_attn.q_proj.weight"),
        ("lmm.model.embed_tokens.weight", "lmm.model.language_model.embed_tokens.weight"),
        ("lmm.lm_head.weight", "lmm.lm_head.weight"),
        ("transformer.proj_out.weight", "transformer.proj_out.weight"),
    ]
    for reference, current in pairs:
        assert qwen_key_to_current(reference) == current
        assert qwen_key_to_current(current) == current
        assert qwen_key_to_reference(current) == reference
        assert qwen_key_to_reference(reference) == reference


def test_wrapper_prefixes_are_stripped_but_inner_model_kept():
    state = {"module.model.connector.x": torch.zeros(1), "model.lmm.model.norm.weight": torch.zeros(1),
             "meta_queries": torch.zeros(1)}
    assert set(normalize_checkpoint_keys(state)) == {
        "connector.x", "lmm.model.language_model.norm.weight", "meta_queries"}


def test_sft_pth_omits_vae_lmm_ema():
    state = {"vae.decoder.w": torch.zeros(1), "lmm.model.language_model.norm.weight": torch.zeros(1),
             "ema.transformer.w": torch.zeros(1), "transformer.w": torch.zeros(1), "projector_1.weight": torch.zeros(1)}
    assert set(to_reference_keys(state)) == {"transformer.w", "projector_1.weight"}
    assert set(to_reference_keys(state, include_lmm=True)) == {"transformer.w", "projector_1.weight",
                                                                "lmm.model.norm.weight"}


def test_lora_merge_by_hand():
    # W = I (2x2), A = [[1, 2]] (rank 1), B = [[1], [0]], alpha 2 -> delta (2/1) B A = [[2, 4], [0, 0]].
    state = {
        "lmm.model.language_model.layers.0.q_proj.base_layer.weight": torch.eye(2),
        "lmm.model.language_model.layers.0.q_proj.lora_A.default.weight": torch.tensor([[1.0, 2.0]]),
        "lmm.model.language_model.layers.0.q_proj.lora_B.default.weight": torch.tensor([[1.0], [0.0]]),
    }
    split = split_lora(state)
    assert list(split.plain) == ["lmm.model.language_model.layers.0.q_proj.weight"]  # base_layer. removed
    torch.testing.assert_close(split.plain["lmm.model.language_model.layers.0.q_proj.weight"], torch.eye(2))
    (pair,) = split.pairs
    assert pair.target == "lmm.model.language_model.layers.0.q_proj.weight" and pair.kind == "linear"
    torch.testing.assert_close(pair.delta(lora_alpha=2.0), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))


def test_llm_lora_in_checkpoint_is_added_to_path_weights(tiny_model_args, tmp_path):
    source = build_tiny_deepgen(seed=0)
    state = to_reference_keys(source.state_dict())
    base = source.lmm.state_dict()["model.language_model.layers.1.self_attn.v_proj.weight"]
    lora_a = torch.full((4, base.shape[1]), 0.01)
    lora_b = torch.full((base.shape[0], 4), 0.02)
    state["lmm.model.layers.1.self_attn.v_proj.lora_A.default.weight"] = lora_a
    state["lmm.model.layers.1.self_attn.v_proj.lora_B.default.weight"] = lora_b
    path = tmp_path / "with_lora.pth"
    torch.save(state, path)
    model = load_deepgen_model(dataclasses.replace(tiny_model_args, checkpoint=str(path),
                                                   checkpoint_llm_lora_alpha=8.0))
    expected = base + (8.0 / 4) * (lora_b @ lora_a)  # every entry: base + 2 * 4 * 0.01 * 0.02
    torch.testing.assert_close(model.lmm.state_dict()["model.language_model.layers.1.self_attn.v_proj.weight"],
                               expected)


def test_parameters_no_gradient_reaches_are_not_demanded(tiny_model_args, tmp_path):
    """SD3's last block drops its text stream, so its add_q_proj never trains and RL checkpoints omit it."""
    model = build_tiny_deepgen(seed=0)
    model.set_trainable("dit_connector_llm")
    last = len(model.transformer.transformer_blocks) - 1
    assert f"transformer.transformer_blocks.{last}.attn.add_q_proj" in model.unreachable_parameters
    assert not model.transformer.transformer_blocks[last].attn.add_q_proj.weight.requires_grad
    assert not any(p.requires_grad for p in model.lmm.model.visual.parameters())
    assert model.transformer.transformer_blocks[0].attn.add_q_proj.weight.requires_grad

    state = to_reference_keys(model.state_dict())
    for suffix in ("weight", "bias"):
        del state[f"transformer.transformer_blocks.{last}.attn.add_q_proj.{suffix}"]
    path = tmp_path / "rl_like.pth"
    torch.save(state, path)
    load_deepgen_model(dataclasses.replace(tiny_model_args, checkpoint=str(path)))  # no CheckpointError

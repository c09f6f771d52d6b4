"""The joint model at REAL size (Qwen2.5-VL-3B + SD3.5-Medium Kontext DiT + DeepGen connector) on ``meta``.

Built through the real loading code from the published config files, without weights: parameter counts,
forward shapes at 512^2 and the mapping of a reference-layout checkpoint at real shapes and key names. The
synthetic checkpoint's tensors are zero-stride views of one element (a few bytes on disk and in memory).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deepgen_rl.model.checkpoint_keys import qwen_key_to_reference, to_reference_keys
from deepgen_rl.model.checkpoint_loading import load_checkpoint_into

# Loading into meta parameters is a shape check; torch says so once per key.
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")

LORA_RANK = 64  # the reference SFT model: r 64, alpha 128


@pytest.fixture()
def real_paths(published_config_paths):
    return published_config_paths  # written by conftest.py's session fixture


@pytest.fixture()
def real_model(real_size_model):
    """Built once per session (conftest.py) by build_deepgen_model_on_meta from the written config files."""
    return real_size_model[1]


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def test_config_files_are_in_the_published_layouts(real_paths):
    sd3, qwen = real_paths
    qwen_config = json.loads((qwen / "config.json").read_text())
    assert "text_config" not in qwen_config and qwen_config["hidden_size"] == 2048  # flat, as published
    assert qwen_config["rope_scaling"]["mrope_section"] == [16, 24, 24] and qwen_config["tie_word_embeddings"]
    dit = json.loads((sd3 / "transformer" / "config.json").read_text())
    assert dit["_class_name"] == "SD3Transformer2DKontextModel" and dit["dual_attention_layers"] == list(range(13))


def test_real_parameter_counts(real_model):
    model = real_model
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lmm.lm_head.weight is model.lmm.get_input_embeddings().weight  # tied, counted once

    # Qwen2.5-VL-3B language model, closed form: embeddings + 36 x (attention with q/k/v biases, 2 KV heads of
    # 128, SwiGLU MLP, 2 RMSNorms) + final norm.
    hidden, inter, vocab, layers, kv = 2048, 11008, 151936, 36, 2 * 128
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    llm = vocab * hidden + layers * (attention + 3 * hidden * inter + 2 * hidden) + hidden
    assert _count(model.lmm) - _count(model.lmm.model.visual) == llm
    assert abs(_count(model.lmm) - 3.75e9) < 0.01e9  # LLM + vision tower ~3.75 B

    # Connector (6 SigLIP layers, 2048 / 11946) + projectors + 128 meta queries, closed form.
    d, i = 2048, 11946
    layer = 4 * (d * d + d) + 2 * (2 * d) + (d * i + i) + (i * d + d)
    projectors = (6 * d * d + d) + (d * 2048 + 2048) + (d * 4096 + 4096)
    connector = _count(model.connector, model.projector_1, model.projector_2, model.projector_3)
    assert connector + model.meta_queries.numel() == 6 * layer + projectors + 128 * d
    assert abs(connector + model.meta_queries.numel() - 0.43e9) < 0.01e9

    model.set_trainable("dit")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)
    assert abs(trainable - 2.24e9) < 0.01e9  # the DiT minus the last block's unreachable text query projection
    assert trainable == _count(model.transformer) - (1536 * 1536 + 1536)


def test_real_forward_shapes_on_meta(real_model):
    model = real_model
    assert model.latent_shape(512, 512) == (16, 64, 64)
    with torch.no_grad():
        embeds, pooled = model.encode_prompt(["a red apple", 'a sign that says "OPEN"'])
        assert embeds.shape[0] == 2 and embeds.shape[1] > 128 and embeds.shape[2] == 4096
        assert pooled.shape == (2, 2048)
        latents = torch.empty(2, 16, 64, 64, device="meta")
        velocity = model.predict_velocity(latents, torch.empty(2, device="meta"), embeds, pooled)
        assert velocity.shape == (2, 16, 64, 64)
        assert model.decode_latents(latents).shape == (2, 3, 512, 512)


def _reference_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A DeepGen pretraining .pth at real shapes: DiT, connector, projectors, meta queries (reference names) and
    the LLM LoRA on EVERY Linear and Embedding (lm_head included), half the keys behind ``module.``, the LoRA in
    the old Qwen layout on even layers and the current one elsewhere. One stored element per tensor."""
    one = torch.zeros((), dtype=torch.bfloat16)
    state = {key: one.expand(value.shape) for key, value in to_reference_keys(model.state_dict()).items()}
    for name, module in model.lmm.named_modules():
        if name.startswith("model.visual") or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        key = "lmm." + name
        old_layout = ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) % 2 == 0
        key = qwen_key_to_reference(key) if old_layout else key
        rows, cols = module.weight.shape
        if isinstance(module, nn.Embedding):  # peft: A [r, num_embeddings], B [embedding_dim, r]
            state[f"{key}.lora_embedding_A.default"] = one.expand(LORA_RANK, rows)
            state[f"{key}.lora_embedding_B.default"] = one.expand(cols, LORA_RANK)
        else:  # A [r, in], B [out, r]
            state[f"{key}.lora_A.default.weight"] = one.expand(LORA_RANK, cols)
            state[f"{key}.lora_B.default.weight"] = one.expand(rows, LORA_RANK)
    return {("module." if index % 2 else "") + k: v for index, (k, v) in enumerate(state.items())}


@pytest.mark.parametrize("trainable", ["dit", "dit_connector"])
def test_reference_checkpoint_maps_at_real_size(real_model, tmp_path, trainable):
    state = _reference_checkpoint(real_model)
    path = tmp_path / "deepgen_pretrain.pth"
    torch.save(state, path)
    assert path.stat().st_size < 20e6  # zero-stride tensors: the file holds one element per tensor

    summary = load_checkpoint_into(real_model, path, trainable_modules=trainable, llm_lora_alpha=128.0)
    # Zero missing trainable keys (the loader raises otherwise) and zero unexplained keys:
    assert summary.unused == []
    assert set(summary.skipped) == {"lmm.lm_head.lora_A.default.weight", "lmm.lm_head.lora_B.default.weight"}
    linears = 36 * 7  # q, k, v, o, gate, up, down per decoder layer (lm_head skipped: tied)
    assert summary.merged == {"linear": linears, "embedding": 1}
    assert len(summary.accounted_keys()) == summary.total_keys == len(state)
    assert not any(key.startswith(("transformer.", "connector.", "projector_", "meta_queries"))
                   for key in summary.missing_keys)

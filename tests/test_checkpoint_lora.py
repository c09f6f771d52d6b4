"""An SFT checkpoint with the reference's LLM LoRA (every Linear AND Embedding, tied lm_head) loads exactly.

The LoRA factors are made by peft itself (``inject_adapter_in_model``) on a tied-embedding tiny Qwen2.5-VL, so
the key names are peft's real ones; the expected merged weights are computed here from the factors:
Linear W + (alpha / r) B A, Embedding W + (alpha / r) (B A)^T.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from deepgen_rl.model import load_deepgen_model
from deepgen_rl.model.checkpoint_keys import qwen_key_to_current, qwen_key_to_reference, split_lora, to_reference_keys
from deepgen_rl.model.checkpoint_loading import load_checkpoint_into
from deepgen_rl.model.tiny import build_tiny_deepgen

# peft warns that a tied layer (lm_head) carries an adapter: exactly the reference checkpoint's situation.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")

ALPHA = 8.0
LINEAR_RANK, EMBEDDING_RANK = 4, 3  # different ranks: r must be read from each pair's tensors


@pytest.fixture(scope="module")
def tied_args(tiny_paths, tmp_path_factory):
    """The tiny model with Qwen2.5-VL-3B's tie_word_embeddings (lm_head.weight IS embed_tokens.weight)."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS

    qwen = tmp_path_factory.mktemp("tied") / "qwen2_5_vl"
    shutil.copytree(tiny_paths.qwen_dir, qwen)
    config = json.loads((qwen / "config.json").read_text())
    config["tie_word_embeddings"] = True
    config["text_config"]["tie_word_embeddings"] = True
    (qwen / "config.json").write_text(json.dumps(config))
    weights = load_file(qwen / "model.safetensors")
    del weights["lm_head.weight"]  # a tied model's file holds the tensor once, as the published 3B does
    save_file(weights, qwen / "model.safetensors", metadata={"format": "pt"})
    return ModelArguments(sd3_model_name_or_path=str(tiny_paths.sd3_dir), qwen2_5_vl_model_name_or_path=str(qwen),
                          checkpoint=str(tiny_paths.checkpoint), model_dtype="float32", **TINY_MODEL_FLAGS)


def _peft_lora_state(lmm: nn.Module) -> dict[str, torch.Tensor]:
    """peft LoRA on every Linear and Embedding of the language model and the lm_head, random factors, keys under
    ``lmm.`` in the reference (old transformers) layout for even layers and the current layout for odd ones."""
    targets = [name for name, module in lmm.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and not name.startswith("model.visual")]
    assert "lm_head" in targets and "model.language_model.embed_tokens" in targets
    wrapped = inject_adapter_in_model(LoraConfig(r=LINEAR_RANK, lora_alpha=ALPHA, target_modules=targets,
                                                 rank_pattern={"embed_tokens": EMBEDDING_RANK}),
                                      copy.deepcopy(lmm))
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, value in wrapped.state_dict().items():
        if ".lora_" not in name:
            continue
        key = "lmm." + name
        layer = name.split("layers.")[1].split(".")[0] if "layers." in name else "0"
        state[qwen_key_to_reference(key) if int(layer) % 2 == 0 else key] = 0.1 * torch.randn(
            value.shape, generator=generator)
    return state


def _checkpoint(tmp_path, lora_state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None):
    state = to_reference_keys(build_tiny_deepgen(seed=0).state_dict())
    state.update(lora_state)
    state.update(extra or {})
    path = tmp_path / "sft_with_llm_lora.pth"
    torch.save({"state_dict": {("module." if i % 2 else "") + k: v for i, (k, v) in enumerate(state.items())}}, path)
    return path


def test_tied_reference_lora_loads_and_merges_exactly(tied_args, tmp_path):
    base = load_deepgen_model(tied_args)
    assert base.lmm.lm_head.weight is base.lmm.get_input_embeddings().weight
    lora = _peft_lora_state(base.lmm)
    assert any(".lora_embedding_A." in k for k in lora) and "lmm.lm_head.lora_A.default.weight" in lora
    path = _checkpoint(tmp_path, lora)

    model = load_deepgen_model(dataclasses.replace(tied_args, checkpoint=str(path), checkpoint_llm_lora_alpha=ALPHA))
    before, after = base.lmm.state_dict(), model.lmm.state_dict()
    checked = set()
    for key, a in lora.items():
        if ".lora_A." not in key and ".lora_embedding_A." not in key:
            continue
        b = lora[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        module = key.split(".lora_")[0].removeprefix("lmm.")
        name = next(n for n in (module + ".weight", "model.language_model." + module.removeprefix("model.") + ".weight")
                    if n in after)
        if module == "lm_head":
            continue  # tied: checked through the embedding below
        if ".lora_embedding_A." in key:  # A [r, num_embeddings], B [dim, r]
            expected = before[name] + (ALPHA / a.shape[0]) * (b @ a).T
        else:  # A [r, in], B [out, r]
            expected = before[name] + (ALPHA / a.shape[0]) * (b @ a)
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6)
        checked.add(name)
    assert "model.language_model.embed_tokens.weight" in checked and len(checked) > 50
    # The lm_head LoRA was NOT applied: the tied tensor carries only the embedding's delta.
    assert model.lmm.lm_head.weight is model.lmm.get_input_embeddings().weight
    # Every other LLM tensor (norms, vision tower) is untouched.
    for name, value in after.items():
        if name not in checked and name != "lm_head.weight":
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_summary_names_every_key_that_is_not_loaded(tied_args, tmp_path, caplog):
    base = build_tiny_deepgen(seed=0)
    lora = {k: v for k, v in _peft_lora_state(base.lmm).items()
            if ".layers.1." in k or "embed_tokens" in k or "lm_head" in k}
    embed_a = next(k for k in lora if ".lora_embedding_A." in k)
    lonely = "lmm.model.language_model.layers.3.mlp.up_proj.lora_A.default.weight"  # its lora_B is absent
    dora = "lmm.model.language_model.layers.1.mlp.up_proj.lora_magnitude_vector.default.weight"
    extra = {
        qwen_key_to_reference(lonely): torch.zeros(LINEAR_RANK, 64),
        qwen_key_to_reference(dora): torch.ones(128),
        "lmm.lm_head.weight": torch.zeros(640, 64),  # the tied name of the embedding
        "ema.transformer.proj_out.weight": torch.zeros(2),
    }
    path = _checkpoint(tmp_path, lora, extra)
    model = load_deepgen_model(dataclasses.replace(tied_args, checkpoint=""))
    with caplog.at_level(logging.INFO, logger="deepgen_rl.model.checkpoint_loading"):
        summary = load_checkpoint_into(model, path, llm_lora_alpha=ALPHA)

    linear_pairs = sum(1 for k in lora if ".lora_A." in k and "lm_head" not in k)
    assert summary.merged == {"linear": linear_pairs, "embedding": 1}
    assert qwen_key_to_current(embed_a) in summary.merged_keys
    # Summary names are the normalised ones (wrapper prefixes stripped, current Qwen layout).
    assert set(summary.skipped) == {lonely, dora, "lmm.lm_head.weight", "lmm.lm_head.lora_A.default.weight",
                                    "lmm.lm_head.lora_B.default.weight"}
    assert "logits" in summary.skipped["lmm.lm_head.lora_A.default.weight"]
    assert "partner" in summary.skipped[lonely]
    assert summary.unused == ["ema.transformer.proj_out.weight"]
    assert len(summary.accounted_keys()) == summary.total_keys
    logged = caplog.text
    for key in [*summary.skipped, *summary.unused]:
        assert key in logged, f"{key} is not named in the logged load summary"
    assert f"{len(summary.loaded)} loaded" in logged and "embedding: 1" in logged


def test_embedding_lora_delta_by_hand():
    # A [r=1, num_embeddings=3] = [[1, 2, 3]], B [dim=2, r=1] = [[1], [0]], alpha 2:
    # (2/1) (B A)^T = 2 [[1, 0], [2, 0], [3, 0]].
    state = {"lmm.model.language_model.embed_tokens.lora_embedding_A.default": torch.tensor([[1.0, 2.0, 3.0]]),
             "lmm.model.language_model.embed_tokens.lora_embedding_B.default": torch.tensor([[1.0], [0.0]])}
    (pair,) = split_lora(state).pairs
    assert pair.kind == "embedding" and pair.target == "lmm.model.language_model.embed_tokens.weight"
    torch.testing.assert_close(pair.delta(lora_alpha=2.0), torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0]]))


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_row_blocks_of_the_delta_tile_the_whole_delta(kind):
    """The loader merges a row block at a time; the blocks must tile (alpha / r) B A (resp. its transpose)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    suffix = ("lora_A.default.weight", "lora_B.default.weight") if kind == "linear" else (
        "lora_embedding_A.default", "lora_embedding_B.default")
    (pair,) = split_lora({f"m.{suffix[0]}": a, f"m.{suffix[1]}": b}).pairs
    whole = (4.0 / 3) * (b @ a if kind == "linear" else (b @ a).T)
    assert pair.target_shape == whole.shape
    blocks = [pair.delta_rows(slice(start, start + 2), lora_alpha=4.0) for start in range(0, whole.shape[0], 2)]
    torch.testing.assert_close(torch.cat(blocks), whole)

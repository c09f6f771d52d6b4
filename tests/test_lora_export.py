"""A --use_lora run exported by scripts/utils/rlckpt_to_sftckpt.py reproduces the trained model (issue 30 item 5).

One real LoRA run of the trainer (tiny model, one GRPO step, rank 4, alpha 12: scale 3, far from the LLM LoRA's
default 128 / r) writes checkpoint-1; its export, loaded the documented way (``load_state_dict(strict=False)`` on
top of the base model), through our CHECKPOINT loader, or (``--keep_lora``) through peft's own
``PeftModel.from_pretrained``, gives the trained model's velocity to float32 rounding; the base model does not.
The expected merged weights are computed here from the trained model's own factors: W + (alpha / r) B A.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from deepgen_rl.model import load_checkpoint_into, load_deepgen_model
from deepgen_rl.model.checkpoint_loading import CheckpointError
from deepgen_rl.model.tiny import TINY_IMAGE_SIZE
from tests.conftest import REPO_ROOT, model_args_for
from tests.test_trainer_inprocess import build
from tests.tolerances import assert_close_up_to_reordering, reordering_tolerance

pytestmark = pytest.mark.timeout(600)

RANK, ALPHA = 4, 12.0
# The DiT's sequential reductions (test_kontext_edit.py TINY_DIT_REDUCTIONS), plus one: the trained model adds the
# adapter's path (B (A x), 4 + 4 terms) where the merged one rounds W + 3 B A once and sums 32 terms.
DIT_REDUCTIONS = {"reductions": 31, "longest": 128}


def _script():
    spec = importlib.util.spec_from_file_location("rlckpt", REPO_ROOT / "scripts" / "utils" / "rlckpt_to_sftckpt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _inputs(model):
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(2, *model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), generator=generator)
    config = model.transformer.config
    embeds = torch.randn(2, 5, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    return latents, torch.tensor([0.4, 0.8]), embeds, pooled


@torch.no_grad()
def _velocity(model) -> torch.Tensor:
    return model.predict_velocity(*_inputs(model))


@pytest.fixture(scope="module")
def lora_run(process_group, tiny_paths, tmp_path_factory):
    """(checkpoint-1, the trained velocity, {module: (W, A, B)} of the trained DiT's adapted layers)."""
    out = tmp_path_factory.mktemp("lora_run")
    # lr 5e-2: one Adam step moves every B entry by ~0.05, so the adapter changes the velocity by O(1).
    # A small step (2 prompts x 2 images, 2 denoising steps, no SFT-aux): only the export is under test.
    trainer = build(tiny_paths, out, max_steps=1, use_lora=True, lora_rank=RANK, lora_alpha=ALPHA,
                    learning_rate=5e-2, save_strategy="steps", save_steps=1, num_inference_steps=2, rollout_n=2,
                    global_batch_size=4, rollout_micro_batch_size=4, atrain_micro_batch_size=4, sftaux_coef=0)
    try:
        trainer.train()
        model = trainer.model
        velocity = _velocity(model)
        layers = {name: (m.base_layer.weight.detach().clone(), m.lora_A["default"].weight.detach().clone(),
                         m.lora_B["default"].weight.detach().clone())
                  for name, m in model.transformer.named_modules() if hasattr(m, "lora_A")}
    finally:
        trainer.close()
    # Trained: B left its zero init (not everywhere: no gradient reaches the last block's context output).
    assert sum(bool(b.abs().max() > 0) for _, _, b in layers.values()) > len(layers) // 2
    return out / "checkpoint-1", velocity, layers


def test_the_checkpoint_records_the_runs_lora_settings_and_base_model(lora_run, tiny_paths):
    checkpoint, _, _ = lora_run
    config = json.loads((checkpoint / "trainer_state.json").read_text())["run_config"]
    assert (config["use_lora"], config["lora_rank"], config["lora_alpha"]) == (True, RANK, ALPHA)
    assert config["sd3_model_name_or_path"] == str(tiny_paths.sd3_dir)
    assert config["checkpoint"] == str(tiny_paths.checkpoint)


def test_merged_export_loads_the_readme_way_and_through_our_loader_as_the_trained_model(lora_run, tiny_paths,
                                                                                        tmp_path):
    checkpoint, trained, layers = lora_run
    output = tmp_path / "rl.pth"
    assert _script().main(["--rl_checkpoint", str(checkpoint), "--output", str(output)]) == 0
    converted = torch.load(output, weights_only=True)
    assert not any(".lora_" in key for key in converted)
    for name, (weight, a, b) in layers.items():  # W + (alpha / r) B A, computed here from the trained factors
        expected = weight + (ALPHA / RANK) * (b @ a)
        assert_close_up_to_reordering(converted[f"transformer.{name}.weight"], expected, reductions=2, longest=RANK)

    base = load_deepgen_model(model_args_for(tiny_paths))
    base_velocity = _velocity(base)
    base.load_state_dict(converted, strict=False)  # the documented recipe (docs/cluster_training.md), on top of the pretraining checkpoint
    assert_close_up_to_reordering(_velocity(base), trained, **DIT_REDUCTIONS)
    # The base model is far from the trained one: the comparison above is not vacuous.
    assert (base_velocity - trained).abs().max() > 100 * reordering_tolerance(**DIT_REDUCTIONS) * trained.abs().max()

    ours = load_deepgen_model(model_args_for(tiny_paths))
    load_checkpoint_into(ours, output, trainable_modules="dit")  # every DiT weight is there: accepted
    assert_close_up_to_reordering(_velocity(ours), trained, **DIT_REDUCTIONS)


def test_keep_lora_writes_a_peft_adapter_that_peft_loads_as_the_trained_model(lora_run, tiny_paths, tmp_path):
    from peft import PeftModel

    checkpoint, trained, _ = lora_run
    folder = tmp_path / "adapter"
    assert _script().main(["--rl_checkpoint", str(checkpoint), "--keep_lora", "--output", str(folder)]) == 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, ALPHA, "LORA")
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "rl_weights.pth").exists()
    model = load_deepgen_model(model_args_for(tiny_paths))
    PeftModel.from_pretrained(model.transformer, str(folder))  # injects the adapter into model.transformer
    assert_close_up_to_reordering(_velocity(model), trained, **DIT_REDUCTIONS)


def test_raw_factors_are_refused_by_our_loader_and_an_unrecorded_alpha_must_be_given(lora_run, tiny_paths, tmp_path):
    checkpoint, _, _ = lora_run
    from deepgen_rl.model.convert import read_rl_checkpoint

    raw, _ = read_rl_checkpoint(checkpoint)
    torch.save(raw, tmp_path / "raw.pth")
    with pytest.raises(CheckpointError, match="rlckpt_to_sftckpt.py"):
        load_checkpoint_into(load_deepgen_model(model_args_for(tiny_paths)), tmp_path / "raw.pth")
    # A state-dict file carries no run config: the run's alpha must be named, and is then used.
    script = _script()
    assert script.main(["--rl_checkpoint", str(tmp_path / "raw.pth"), "--output", str(tmp_path / "o.pth"),
                        "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                        "--checkpoint", str(tiny_paths.checkpoint)]) == 2
    assert script.main(["--rl_checkpoint", str(tmp_path / "raw.pth"), "--output", str(tmp_path / "o.pth"),
                        "--sd3_model_name_or_path", str(tiny_paths.sd3_dir), "--checkpoint",
                        str(tiny_paths.checkpoint), "--lora_alpha", str(ALPHA)]) == 0


def test_eval_layers_a_lora_checkpoint_folder_at_the_runs_own_scale(lora_run, tiny_paths):
    """`python -m deepgen_rl.eval --rl_checkpoint checkpoint-N` of a --use_lora run: the factors are merged at the
    run's alpha / r (from its trainer_state.json) on top of CHECKPOINT, giving the trained model; a LoRA-only
    checkpoint (no DiT weights) is not refused for lacking the weights the run trained through its factors."""
    from deepgen_rl.model.convert import load_rl_checkpoint_into

    checkpoint, trained, _ = lora_run
    model = load_deepgen_model(model_args_for(tiny_paths))
    summary = load_rl_checkpoint_into(model, checkpoint, trainable_modules="dit")
    assert summary.merged["linear"] > 0 and all(".lora_" in key for key in summary.merged_keys)
    assert_close_up_to_reordering(_velocity(model), trained, **DIT_REDUCTIONS)

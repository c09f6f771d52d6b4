"""The memory estimator at the guide's defaults: its weight, optimizer and storage figures equal closed forms
computed here from the published model sizes; activation figures are measured on the meta model (decode scales
with its micro-batch; the per-block train composition matches a whole-DiT measurement)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import SD3Transformer2DModel

import deepgen_rl.estimate_memory as estimate_module
from deepgen_rl.config import GRPOConfig, ModelArguments
from deepgen_rl.estimate_memory import (GIB, RunShape, candidate_changes, dit_train_activation_bytes,
                                        estimate_memory, main)
from deepgen_rl.model.meta_memory import block_peak_bytes, distinct_blocks, measured_activation_peak
from deepgen_rl.model.published_configs import SD35M_KONTEXT_TRANSFORMER_CONFIG

# Qwen2.5-VL-3B language model (tied embeddings counted once), closed form.
H, I, V, LAYERS, KV = 2048, 11008, 151936, 36, 2 * 128
LLM = V * H + LAYERS * ((H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * I + 2 * H) + H
# Connector (6 x SigLIP layer 2048 / 11946) + projector_1 (12288 -> 2048), _2 (-> 2048), _3 (-> 4096) + 128 queries.
D, F = 2048, 11946
CONNECTOR = 6 * (4 * (D * D + D) + 4 * D + (D * F + F) + (F * D + D)) + (6 * D * D + D) + (D * D + D) \
    + (D * 4096 + 4096) + 128 * D
UNREACHABLE = 1536 * 1536 + 1536  # the last DiT block's text-stream query projection (never trained)


@pytest.fixture()
def real(real_size_model):
    return real_size_model  # (ModelArguments, real-size meta model), built once per session in conftest.py


@pytest.fixture()
def guide_args(tmp_path):
    return GRPOConfig(output_dir=str(tmp_path), report_to="none")  # docs/training_guide.md#default-parameters


def _trainable_dit(model) -> int:
    model.set_trainable("dit")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)
    return count


def test_zero2_weights_and_optimizer_equal_closed_forms(real, guide_args):
    model_args, model = real
    # The 30 GiB story below predates --kl_forward shared, whose kept KL gradient adds 4.2 GiB to the train phase
    # (test_kl_forward_shared_adds_the_kept_kl_gradient_to_the_train_phase): told here on 'separate'.
    guide_args = dataclasses.replace(guide_args, kl_forward="separate")
    estimate = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=2, model=model)
    c = estimate.components
    trainable = _trainable_dit(model)
    assert abs(trainable - 2.24e9) < 0.01e9
    assert c["weights: lmm (Qwen2.5-VL language model)"] == 2 * LLM
    assert c["weights: connector + projectors + meta queries"] == 2 * CONNECTOR
    assert c["weights: transformer (SD3.5 DiT)"] == 2 * (trainable + UNREACHABLE)
    assert c["reference policy copy (frozen trained modules)"] == 2 * (trainable + UNREACHABLE)
    # ZeRO-2 per rank: bf16 + fp32 gradients, fp32 master weights, Adam m and v, each 1/8 of the trainable ones.
    assert c["gradients + optimizer states (ZeRO-2, DeepSpeed estimate)"] == (2 + 4 + 4 + 8) * trainable // 8
    # 32 images per rank at 512^2: latents [51, 32, 16, 64, 64] fp32, log-probs [50, 32], prompt embeddings
    # [32, 64 + 128, 4096] and pooled [32, 2048] in bf16, images [32, 3, 512, 512] fp32.
    rollout = 51 * 32 * 16 * 64 * 64 * 4 + 50 * 32 * 4 + 32 * (192 * 4096 + 2048) * 2 + 32 * 3 * 512 * 512 * 4
    assert c["rollout storage (latents, log-probs, embeddings, images)"] == rollout
    assert c["weights: vision tower (dropped for t2i)"] == 0  # the trainer drops it (model/vision_tower.py)
    static = sum(c[name] for name in estimate.static)
    assert estimate.total_bytes == static + max(c[name] for name in estimate.transients)
    # Decoding all 32 images at once (the old behaviour) makes the decode the peak, in the issue's ~33-38 GiB
    # range less the dropped vision tower (1.25 GiB); the default decode micro-batch (8) takes it under 30 GiB.
    all_at_once = estimate_memory(model_args, dataclasses.replace(guide_args, vae_decode_micro_batch_size=32),
                                  num_gpus=8, zero_stage=2, model=model)
    assert all_at_once.peak_phase.startswith("VAE decode") and 31 * GIB < all_at_once.total_bytes < 38 * GIB
    assert estimate.total_bytes < 30 * GIB and not estimate.peak_phase.startswith("VAE decode")


def test_zero3_partitions_weights_and_gathers_the_largest_layer(real, guide_args):
    model_args, model = real
    c = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=3, model=model).components
    trainable = _trainable_dit(model)
    largest = V * H  # the (tied) token embedding is the largest single layer
    assert c["gradients + optimizer states (ZeRO-3, DeepSpeed estimate)"] == 4 * largest + 18 * trainable // 8
    assert c["weights: transformer (SD3.5 DiT)"] == 0  # inside the ZeRO-3 model states
    assert c["weights: lmm (Qwen2.5-VL language model)"] == -(-2 * LLM // 8)  # frozen, partitioned over 8


def test_decode_peak_is_measured_and_scales_with_the_micro_batch(real, guide_args):
    model_args, model = real
    peaks = {}
    for n in (8, 32):
        args = dataclasses.replace(guide_args, vae_decode_micro_batch_size=n)
        components = estimate_memory(model_args, args, num_gpus=8, zero_stage=2, model=model).components
        peaks[n] = components[f"VAE decode, n={n}"]
    assert peaks[32] > 32 * 3 * 512 * 512 * 4  # at least its own fp32 output images
    assert 3.5 < peaks[32] / peaks[8] < 4.5


def test_train_activation_composition_by_hand():
    # checkpointing: (L - 1) x inputs + largest block peak + 8 fp32 latents; without: L x largest block peak + same.
    assert dit_train_activation_bytes([10, 30], 5, layers=4, latent_elems=2, n=1, gradient_checkpointing=True) \
        == 3 * 5 + 30 + 8 * 1 * 2 * 4
    assert dit_train_activation_bytes([10, 30], 5, layers=4, latent_elems=2, n=1, gradient_checkpointing=False) \
        == 4 * 30 + 8 * 1 * 2 * 4


def test_composed_train_peak_matches_a_whole_dit_measurement():
    """A 4-block SD3.5 DiT (2 dual-attention blocks) at 512^2: the per-block composition the estimator uses vs
    MemTracker over the whole checkpointed forward + backward (the 24-block run agrees too but takes minutes)."""
    config = dict(SD35M_KONTEXT_TRANSFORMER_CONFIG, num_layers=4, dual_attention_layers=[0, 1])
    with torch.device("meta"):
        dit = SD3Transformer2DModel.from_config(config).to(torch.bfloat16)
    dit.requires_grad_(False)
    dit.enable_gradient_checkpointing()
    dit.train()
    n, text = 4, 192

    def whole_step() -> None:
        velocity = dit(hidden_states=torch.empty(n, 16, 64, 64, device="meta", dtype=torch.bfloat16),
                       timestep=torch.empty(n, device="meta", dtype=torch.bfloat16),
                       encoder_hidden_states=torch.empty(n, text, 4096, device="meta", dtype=torch.bfloat16),
                       pooled_projections=torch.empty(n, 2048, device="meta", dtype=torch.bfloat16),
                       return_dict=False)[0]
        velocity.float().square().mean().backward()

    measured = measured_activation_peak(whole_step, dit)
    peaks = [block_peak_bytes(block, n, 1024, text, True) for block in distinct_blocks(dit)]
    composed = dit_train_activation_bytes(peaks, n * (1024 + text) * 1536 * 2, 4, 16 * 64 * 64, n, True)
    assert abs(composed / measured - 1) < 0.05


def test_command_line_names_flags_that_make_it_fit(real, capsys, monkeypatch):
    model_args, model = real
    monkeypatch.setattr(estimate_module, "build_meta_model", lambda args: model)  # the same real-size build
    code = main(["--output_dir", "unused", "--report_to", "none", "--num_gpus", "8", "--gpu_memory_gib", "30",
                 "--vae_decode_micro_batch_size", "32",
                 "--sd3_model_name_or_path", model_args.sd3_model_name_or_path,
                 "--qwen2_5_vl_model_name_or_path", model_args.qwen2_5_vl_model_name_or_path,
                 "--deepspeed", "scripts/deepspeed/zero2.json",
                 "--kl_forward", "separate"])  # the decode story (shared's kept gradient: the test below)
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT in 30 GiB" in out and "weights: vision tower" in out
    suggestions = [line for line in out.splitlines() if line.strip().startswith("--") and "->" in line]
    assert any("--vae_decode_micro_batch_size 4" in line for line in suggestions)
    assert all(float(line.split("->")[1].split()[0]) <= 30 for line in suggestions)


def test_algorithm_storage_grpoguard_means_and_nft_old_copy(real, guide_args):
    model_args, model = real
    trainable = _trainable_dit(model)
    guard = estimate_memory(model_args, dataclasses.replace(guide_args, atrain_algorithm="grpoguard"), num_gpus=8,
                            zero_stage=2, model=model).components
    assert guard["GRPO-Guard step means"] == 50 * 32 * 16 * 64 * 64 * 4  # [T, N, C, h, w] fp32
    nft_args = dataclasses.replace(guide_args, atrain_algorithm="diffusionnft", init_same_noise=None)
    nft = estimate_memory(model_args, nft_args, num_gpus=8, zero_stage=2, model=model).components
    assert nft["DiffusionNFT old-policy copy"] == 2 * (trainable + UNREACHABLE) and "GRPO-Guard step means" not in nft


def test_edit_dataset_keeps_the_vision_tower_in_the_estimate(real, guide_args):
    # An edit YAML keeps the vision tower on every GPU (trainer/edit_rollout.py): its bf16 weights, ~0.67 B x 2 bytes.
    model_args, model = real
    visual = sum(p.numel() for p in model.lmm.model.visual.parameters())
    assert abs(visual - 0.67e9) < 0.01e9
    t2i = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=2, model=model)
    edit = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=2, model=model, edit=True)
    assert edit.components["weights: vision tower (dropped for t2i)"] == 2 * visual
    assert edit.total_bytes - t2i.total_bytes == 2 * visual


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload", "zero3_sd3"])
def test_command_line_runs_on_every_shipped_deepspeed_config(config, tiny_paths, capsys):
    """The CLI builds its meta model itself here: under a ZeRO-3 JSON transformers once built it inside
    deepspeed.zero.Init, which needs mpi4py outside a launcher (ModuleNotFoundError on every ZeRO-3 config)."""
    code = main(["--output_dir", "unused", "--report_to", "none", "--num_gpus", "8",
                 "--deepspeed", f"scripts/deepspeed/{config}.json",
                 "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                 "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir), *tiny_paths.model_flags()])
    out = capsys.readouterr().out
    assert code == 0 and "PEAK per rank" in out and "FITS in 80 GiB" in out
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # nothing left registered for the tests that follow


def test_help_lists_the_estimator_flags_first(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    first = [out.index(flag) for flag in ("--num_gpus", "--gpu_memory_gib", "--prompt_tokens")]
    assert max(first) < out.index("--rollout_n") < out.index("--learning_rate")
    assert "--per_device_train_batch_size" not in out  # refused inherited flags are hidden, as in the trainer's


def test_a_smaller_training_chunk_says_what_it_costs_the_rollout(guide_args):
    # Guide defaults: rollout micro-batch 32, chunk 32 -> 16, 8, 4, 2, 1; each is below the rollout micro-batch,
    # so each says that the rollout's forwards shrink to it (BatchPlan.forward_rows).
    from deepgen_rl.estimate_memory import RunShape, candidate_changes

    labels = [flags for flags, _ in candidate_changes(RunShape(guide_args, ModelArguments(), zero_stage=2))]
    chunk = [label for label in labels if label.startswith("--atrain_micro_batch_size")]
    assert [label.split()[1] for label in chunk] == ["16", "8", "4", "2", "1"]
    for label in chunk:
        rows = label.split()[1]
        assert label.endswith(f"(the rollout's DiT forwards shrink to {rows} rows too: same FLOPs, smaller kernels)")
    wide = dataclasses.replace(guide_args, rollout_micro_batch_size=8)
    labels = [flags for flags, _ in candidate_changes(RunShape(wide, ModelArguments(), zero_stage=2))]
    assert "--atrain_micro_batch_size 16" in labels and "--atrain_micro_batch_size 8" in labels  # not below: no cost


def test_ema_is_counted_sharded_on_the_gpu_or_whole_on_the_host(real, guide_args):
    model_args, model = real
    trainable = _trainable_dit(model)
    ema_gpu = "EMA (fp32, sharded beside the master weights)"
    off = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=2, model=model)
    gpu = estimate_memory(model_args, dataclasses.replace(guide_args, ema_decay=0.99), num_gpus=8, zero_stage=2,
                          model=model)
    assert ema_gpu not in off.components and not off.host
    assert gpu.components[ema_gpu] == 4 * trainable // 8 and ema_gpu in gpu.static  # ~1.04 GiB at 2.24 B / 8
    assert gpu.total_bytes - off.total_bytes == 4 * trainable // 8 and not gpu.host
    host = estimate_memory(model_args, dataclasses.replace(guide_args, ema_decay=0.99, ema_device="cpu"), num_gpus=8,
                           zero_stage=2, model=model)
    assert host.total_bytes == off.total_bytes and host.host == {"EMA (fp32, whole copy, --ema_device cpu)":
                                                                 4 * trainable}
    assert "host, not GPU: EMA (fp32, whole copy" in host.describe()


def test_kl_forward_shared_adds_the_kept_kl_gradient_to_the_train_phase(real, guide_args):
    # --kl_forward shared keeps d(beta KL)/dtheta (bf16, one value per trained parameter) from the chunk's backward
    # to the KL step; separate keeps nothing; ZeRO-3 runs separate.
    model_args, model = real
    trainable = _trainable_dit(model)

    def train_phase(kl_forward: str, zero_stage: int) -> int:
        components = estimate_memory(model_args, dataclasses.replace(guide_args, kl_forward=kl_forward), num_gpus=8,
                                     zero_stage=zero_stage, model=model).components
        return next(v for k, v in components.items() if k.startswith("train chunk activations"))

    assert train_phase("shared", 2) - train_phase("separate", 2) == 2 * trainable
    assert train_phase("shared", 3) == train_phase("separate", 3)
    # Two chunks of 16: the second chunk's gradient exists beside the kept one while it is added.
    halves = dataclasses.replace(guide_args, atrain_micro_batch_size=16)
    shared, separate = (estimate_memory(model_args, dataclasses.replace(halves, kl_forward=mode), num_gpus=8,
                                        zero_stage=2, model=model).components["train chunk activations, n=16"]
                        for mode in ("shared", "separate"))
    assert shared - separate == 2 * 2 * trainable
    # The estimator suggests dropping it where it applies.
    named = [flags.split()[:2] for flags, _ in candidate_changes(RunShape(guide_args, model_args, zero_stage=2))]
    assert ["--kl_forward", "separate"] in named
    for other in (dataclasses.replace(guide_args, kl_forward="separate"), dataclasses.replace(guide_args, beta=0.0)):
        assert ["--kl_forward", "separate"] not in [f.split()[:2] for f, _ in candidate_changes(
            RunShape(other, model_args, zero_stage=2))]


def test_sftaux_batch_is_the_busiest_ranks_share_of_the_global_batch(real, guide_args):
    # --sftaux_global_batch_size K over num_gpus W: the busiest rank runs ceil(K / W) items, forward + backward,
    # composed as a train chunk of that many rows (the guide's 32 over 8 ranks: 4, the reference's per-GPU batch).
    model_args, model = real
    guide = estimate_memory(model_args, guide_args, num_gpus=8, zero_stage=2, model=model)
    row = "SFT-aux batch activations, n=4"
    assert row in guide.transients
    blocks = distinct_blocks(model.transformer)
    peaks = [block_peak_bytes(block, 4, 64 * 64 // 4, 64 + 128, True) for block in blocks]  # 1024 + 192 tokens
    assert guide.components[row] == dit_train_activation_bytes(peaks, 4 * (1024 + 192) * 1536 * 2, 24, 16 * 64 * 64,
                                                               4, gradient_checkpointing=True)
    uneven = estimate_memory(model_args, dataclasses.replace(guide_args, sftaux_global_batch_size=33), num_gpus=8,
                             zero_stage=2, model=model)
    assert "SFT-aux batch activations, n=5" in uneven.transients
    off = estimate_memory(model_args, dataclasses.replace(guide_args, sftaux_coef=0.0), num_gpus=8, zero_stage=2,
                          model=model)
    assert not any(name.startswith("SFT-aux") for name in off.components)

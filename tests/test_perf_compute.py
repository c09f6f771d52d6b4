"""The compute model (deepgen_rl/perf/): FlopCounterMode units equal closed forms computed here (a Linear stack,
attention, the real-size SD3.5 DiT forward summed module by module), phase FLOPs scale as the flags say, the bytes
per rank and the table's seconds equal the documented model recomputed here, and the perf/ metrics follow
FLOPs / seconds."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepgen_rl.config import GRPOConfig
from deepgen_rl.estimate.compute import ComputeArguments, compute_report
from deepgen_rl.perf.flop_units import count_flops, train_flops
from deepgen_rl.perf.mfu import StepPerf
from deepgen_rl.perf.peak import peak_tflops_of
from deepgen_rl.perf.step_flops import phase_flops, step_counts
from deepgen_rl.trainer.batching import plan_batches

META = torch.device("meta")


# ----- FlopCounterMode against closed forms ----------------------------------------------------------------------

def test_linear_stack_forward_and_backward_equal_2mnk():
    m, k, n, p = 7, 48, 96, 24
    stack = nn.Sequential(nn.Linear(k, n), nn.GELU(), nn.Linear(n, p)).to(META)
    x = torch.empty(m, k, device=META)
    assert count_flops(lambda: stack(x)) == 2 * m * k * n + 2 * m * n * p
    flops = train_flops(lambda: stack(x), stack.parameters())
    assert flops.forward == 2 * m * k * n + 2 * m * n * p
    # weight gradients of both layers; the input gradient only of the second (x needs none)
    assert flops.backward == 2 * m * k * n + 2 * (2 * m * n * p)
    assert flops.recompute == 0


def test_checkpointed_recompute_is_counted_apart_from_the_backward():
    m, k = 5, 32

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            # Each block ends in a GELU, which keeps its input for backward: the recompute must rerun both Linears
            # (torch stops a recompute once the tensors the backward needs exist: a bare Linear would need none).
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(k, k), nn.GELU(), nn.Linear(k, k), nn.GELU())
                                        for _ in range(3))
            self.checkpointing = False

        def forward(self, x):
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=False) if self.checkpointing else layer(x)
            return x

    import contextlib

    stack = Stack().to(META)

    @contextlib.contextmanager
    def switch(on):
        stack.checkpointing = on
        yield
        stack.checkpointing = False

    x = torch.empty(m, k, device=META)
    flops = train_flops(lambda: stack(x), stack.parameters(), switch)
    linear = 2 * m * k * k
    assert flops.forward == 6 * linear and flops.recompute == 6 * linear
    assert flops.backward == 6 * linear + 5 * linear  # weight grads of 6, input grads of all but the first


def test_attention_is_its_two_matmuls():
    b, h, s, d = 2, 4, 40, 16
    q, k, v = (torch.empty(b, h, s, d, device=META) for _ in range(3))
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * b * h * s * s * d)


# ----- the real-size model (published configs, meta) --------------------------------------------------------------

@pytest.fixture(scope="module")
def guide(real_size_model, tmp_path_factory):
    """The guide's defaults (scripts/train.sh: 8 GPUs, 256 images, 50 steps, 30 trained, reference schedule,
    beta > 0, SFT-aux, gradient checkpointing, ZeRO-2), counted once."""
    model_args, model = real_size_model
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("perf")), report_to="none")
    report = compute_report(model, args, model_args, num_gpus=8, zero_stage=2, prompt_tokens=64,
                            compute_args=ComputeArguments(compute=True))
    return args, model, report


def _dit_closed_form(transformer, image_tokens: int, text_tokens: int) -> int:
    """One SD3.5 DiT forward of one image, summed here module by module: 2 x rows x in x out per Linear (rows: the
    image stream's tokens, the text stream's, or the one conditioning vector), the patch-embedding convolution, and
    4 x S_q x S_kv x D per attention (QK^T and AV; joint attention over image + text, dual attention over image)."""
    text_stream = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "context_embedder")
    one_row = ("norm1.linear", "norm1_context.linear", "norm_out.linear", "time_text_embed")
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            rows = (1 if any(part in name for part in one_row)
                    else text_tokens if any(part in name for part in text_stream) else image_tokens)
            total += 2 * rows * module.in_features * module.out_features
    conv = transformer.pos_embed.proj
    total += 2 * image_tokens * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for block in transformer.transformer_blocks:
        joint = image_tokens + text_tokens
        total += 4 * joint * joint * width
        if getattr(block, "attn2", None) is not None:
            total += 4 * image_tokens * image_tokens * width
    return total


def test_real_size_dit_forward_equals_the_closed_form(guide):
    args, model, report = guide
    units = report.units
    latent = model.latent_shape(args.image_height, args.image_width)
    patch = model.transformer.config.patch_size
    image_tokens = (latent[1] // patch) * (latent[2] // patch)
    assert units.text_tokens == 64 + model.num_queries
    assert units.dit_forward == _dit_closed_form(model.transformer, image_tokens, units.text_tokens)
    # Backward: weight + input gradients (2 forwards) less the patch embedding's input gradient; the recompute: the
    # checkpointed blocks only (not the embeddings / final projection).
    assert 1.99 * units.dit_forward < units.dit_train.backward <= 2 * units.dit_forward
    assert 0.99 * units.dit_forward < units.dit_train.recompute < units.dit_forward
    assert units.dit_train.forward == units.dit_forward
    assert units.dit_reference_forward == units.dit_forward  # no LoRA: the reference is the same DiT


def test_guide_step_flops_equal_the_flag_counts(guide):
    args, _, report = guide
    u, f = report.units, report.flops
    n, prompts, steps, trained = 32, 4, 50, 30  # 256 images / 8 ranks, rollout_n 8, T, int(0.6 x 50)
    train = u.dit_train.forward + u.dit_train.recompute + u.dit_train.backward
    assert f["rollout"] == steps * n * u.dit_forward
    assert f["prompt_encoding"] == prompts * u.text_forward  # no CFG at the guide's defaults: no negative
    assert f["vae_decode"] == n * u.vae_decode
    assert f["policy_forward"] + f["policy_recompute"] + f["policy_backward"] == trained * n * train
    assert f["reference_forward"] == trained * n * u.dit_forward
    # --kl_forward shared (the default): the KL step's own recompute + backward on the policy step's forward
    assert f["kl_step"] == trained * n * (u.dit_train.recompute + u.dit_train.backward)
    assert f["sftaux"] == 4 * (u.vae_encode + u.text_forward + train)
    expected = (steps * n + trained * n) * u.dit_forward + trained * n * train + prompts * u.text_forward \
        + trained * n * (u.dit_train.recompute + u.dit_train.backward) + n * u.vae_decode \
        + 4 * (u.vae_encode + u.text_forward + train)
    assert report.total_flops == expected
    # --kl_forward separate runs the chunk again: its forward, recompute, backward and the reference forward
    assert report.other_kl == ("separate", expected + trained * n * (u.dit_train.forward + u.dit_forward))


def _counts(args, world=8, sftaux=True):
    plan = plan_batches(global_batch_size=args.global_batch_size, rollout_n=args.rollout_n, world_size=world,
                        atrain_micro_batch_size=args.atrain_micro_batch_size,
                        num_train_timesteps=args.num_train_timesteps, sftaux_enabled=sftaux,
                        optimizer_step_schedule=args.optimizer_step_schedule,
                        actor_update_steps=args.atrain_num_actor_update_steps, kl_step=args.beta > 0)
    return step_counts(args, plan, text_trains=False, sftaux=sftaux)


TRAIN_PHASES = ("policy_forward", "policy_recompute", "policy_backward", "reference_forward", "kl_step")


def test_phase_flops_scale_as_the_flags_say(guide):
    args, _, report = guide
    base = phase_flops(report.units, _counts(args))
    double = phase_flops(report.units, _counts(dataclasses.replace(args, global_batch_size=512)))
    for phase in ("rollout", "vae_decode", *TRAIN_PHASES):
        assert double[phase] == 2 * base[phase], phase
    assert double["sftaux"] == base["sftaux"]  # --sftaux_global_batch_size, not the rollout's images
    # K SFT-aux items over 8 ranks: the busiest rank runs ceil(K / 8); a rank with none still runs one (weight 0)
    per_item = base["sftaux"] // 4  # the guide's 32 items / 8 ranks
    for items, busiest in ((32, 4), (10, 2), (33, 5), (3, 1)):
        sft = phase_flops(report.units, _counts(dataclasses.replace(args, sftaux_global_batch_size=items)))
        assert sft["sftaux"] == busiest * per_item, items
    window = dataclasses.replace(args, sde_window_size=10)  # T' = int(10 x 0.6) = 6 of the 30
    windowed = phase_flops(report.units, _counts(window))
    assert window.num_train_timesteps == 6
    for phase in TRAIN_PHASES:
        assert windowed[phase] * 30 == base[phase] * 6, phase
    assert windowed["rollout"] == base["rollout"]  # the ODE steps outside the window still run the DiT
    cfg = phase_flops(report.units, _counts(dataclasses.replace(args, rollout_cfg_scale=4.5)))
    assert cfg["rollout"] == 2 * base["rollout"] and cfg["policy_backward"] == 2 * base["policy_backward"]
    assert cfg["prompt_encoding"] == 5 * report.units.text_forward  # 4 prompts + the one negative
    per_rollout = phase_flops(report.units, _counts(dataclasses.replace(args, optimizer_step_schedule="per_rollout")))
    assert per_rollout["kl_step"] == 0 and per_rollout["reference_forward"] == base["reference_forward"]


def test_bytes_per_rank_and_the_tables_seconds(guide):
    args, model, report = guide
    trained = report.units.trained_params
    assert trained == sum(p.numel() for p in model.transformer.parameters()) - 1536 * 1536 - 1536  # unreachable
    # ZeRO-2 at the reference schedule: 30 policy + 30 KL + 1 SFT-aux backward passes, each reduce-scattering the
    # bf16 gradients, and as many optimizer steps, each all-gathering the updated bf16 weights.
    ring = 7 / 8
    assert report.comm["gradient reduce-scatter"] == pytest.approx(61 * ring * 2 * trained, rel=1e-12)
    assert report.comm["updated-parameter all-gather"] == pytest.approx(61 * ring * 2 * trained, rel=1e-12)
    assert report.comm["advantage / metric collectives"] < 1e6
    # The 2-node cell: FLOPs / (peak x MFU) + bytes at W = 16 over the inter-node bandwidth (defaults: 989.4
    # TFLOP/s, 0.4, 50 GB/s per GPU).
    row = next(r for r in report.rows["reference"] if r.nodes == 2)
    sent = 2 * 61 * (15 / 16) * 2 * trained
    # the "reference" rows are --kl_forward separate's (the shared variant has rows of its own)
    assert report.other_kl[0] == "separate"
    seconds = report.other_kl[1] / (989.4e12 * 0.4) + sent / 50e9
    assert row.world_size == 16 and row.seconds == pytest.approx(seconds, rel=1e-6)
    assert row.images_per_s_per_gpu == pytest.approx(32 / seconds, rel=1e-6)
    one = report.rows["reference"][0]
    assert one.nodes == 1 and one.comm_s == pytest.approx(2 * 61 * ring * 2 * trained / 400e9, rel=1e-6)
    assert [r.nodes for r in report.rows["per_rollout"]] == [1, 2, 4, 8, 16]
    assert "reference, shared KL" in report.rows


def test_command_line_prints_the_compute_table_and_writes_the_plot(tiny_paths, tmp_path, capsys):
    from deepgen_rl.estimate_memory import main

    plot = tmp_path / "scaling.png"
    code = main(["--output_dir", "unused", "--report_to", "none", "--num_gpus", "8", "--compute",
                 "--compute_plot", str(plot), "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                 "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir), *tiny_paths.model_flags()])
    out = capsys.readouterr().out
    assert code == 0 and "PEAK per rank" in out  # the memory half first, unchanged
    assert out.index("PEAK per rank") < out.index("FLOPs of one GRPO step per rank")
    assert "with --kl_forward separate" in out and "gradient reduce-scatter" in out
    for schedule in ("reference", "per_timestep", "per_rollout"):
        rows = [line.split() for line in out.splitlines() if line.strip().startswith(schedule + " ")]
        assert [int(cells[1]) for cells in rows if cells[1].isdigit()] == [1, 2, 4, 8, 16], schedule
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- peak table and the logged perf/ metrics --------------------------------------------------------------------

def test_peak_tflops_from_device_names():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA H200") == 989.4
    assert peak_tflops_of("NVIDIA H20") == 148.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_of("NVIDIA L40S") == 362.1
    assert peak_tflops_of("Tesla T4") is None


def test_perf_metrics_are_flops_over_the_phase_seconds():
    perf = StepPerf(flops={"rollout": 6e12, "train": 9e12}, images_per_rank=32, peak_tflops=3.0)
    timings = {"time/rollout": 2.0, "time/train": 4.5, "time/rewards": 1.0, "time/step": 7.5}
    out = perf.metrics(timings)
    assert out["perf/rollout_tflops"] == pytest.approx(3.0) and out["perf/rollout_mfu"] == pytest.approx(1.0)
    assert out["perf/train_tflops"] == pytest.approx(2.0) and out["perf/train_mfu"] == pytest.approx(2 / 3)
    assert out["perf/step_tflops"] == pytest.approx(2.0) and out["perf/images_per_s_per_gpu"] == pytest.approx(32 / 7.5)
    skipped = perf.metrics({**timings, "train/skipped": 1.0})
    assert "perf/train_tflops" not in skipped and skipped["perf/step_tflops"] == pytest.approx(6 / 7.5)
    unknown = StepPerf(flops=perf.flops, images_per_rank=32, peak_tflops=None).metrics(timings)
    assert "perf/train_tflops" in unknown and not any(key.endswith("_mfu") for key in unknown)


def test_zero3_gathers_each_forward_and_backward(guide):
    from deepgen_rl.perf.comm import ParamBytes, bytes_per_rank, comm_counts

    args = guide[0]
    plan = plan_batches(global_batch_size=256, rollout_n=8, world_size=8, atrain_micro_batch_size=32,
                        num_train_timesteps=30, sftaux_enabled=True, optimizer_step_schedule="reference",
                        actor_update_steps=1, kl_step=True)
    separate = copy.copy(args)
    separate.kl_forward = "separate"  # what ZeRO-3 runs (trainer/kl_forward.py), whatever --kl_forward says
    counts = comm_counts(_counts(separate), plan, rollout_micro_batch_size=32, decode_micro_batch_size=8,
                         forward_rows=32)
    params = ParamBytes(trained=1000, dit=1200, text=3000, vae=80)
    sent = bytes_per_rank(counts, params, world_size=4, zero_stage=3)
    ring = 3 / 4
    # forwards: 50 rollout steps + 30 policy + 30 KL-step chunks + 1 SFT-aux; texts: the rollout's encoding + the
    # SFT-aux captions; VAE: 32 / 8 decodes + 1 SFT-aux encode. Backward: 30 + 30 chunks + 1 SFT-aux.
    assert sent["ZeRO-3 parameter all-gathers (forward)"] == pytest.approx(
        ring * ((50 + 61) * 1200 + 2 * 3000 + 5 * 80), rel=1e-12)
    assert sent["ZeRO-3 parameter all-gathers (backward)"] == pytest.approx(ring * 61 * 1200, rel=1e-12)
    assert sent["gradient reduce-scatter"] == pytest.approx(ring * 61 * 1000, rel=1e-12)
    assert "updated-parameter all-gather" not in sent  # each rank steps its own partition, nothing to gather
    assert bytes_per_rank(counts, params, world_size=4, zero_stage=0)["gradient all-reduce"] == pytest.approx(
        2 * ring * 61 * 1000, rel=1e-12)  # stage 0: one all-reduce per optimizer step


def test_a_nonpositive_peak_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--gpu_peak_tflops must be > 0"):
        GRPOConfig(output_dir=str(tmp_path), report_to="none", gpu_peak_tflops=0.0)

"""EMA of the trained parameters (--ema_decay): the closed-form recursion with its warm-up, fp32 storage, the swap
for evaluation, exact save / resume (weights-only), and the converter's --weights ema, on the tiny trainer; the
sharded EMA (--ema_device gpu) on real 2-rank ZeRO-2 / ZeRO-3 engines against a float64 EMA of the gathered fp32
master weights, its bit-exact resume and its re-sharding to one rank."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from deepgen_rl.config import parse_args
from deepgen_rl.model.convert import convert_rl_checkpoint
from deepgen_rl.model.safe_load import load_weights_only
from deepgen_rl.trainer.ema import EMA, warmup_decay
from deepgen_rl.trainer.ema_shards import GroupLayout, ShardEntry, partition_of, place_piece
from deepgen_rl.trainer.global_draws import rollout_noise
from deepgen_rl.trainer.logging_utils import MetricsLogger
from tests.conftest import REPO_ROOT
from tests.test_trainer_inprocess import build
from tests.scripts import ema_shards_run
from tests.trainer_utils import ZERO3, torchrun


def _perturb(model, generator, scale=1.0):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


def _tiny_linear(dtype=torch.float32):
    model = nn.Linear(3, 2).to(dtype)
    model.bias.requires_grad_(False)  # frozen: never averaged
    return model


def test_warmup_decay_values():
    assert [warmup_decay(s, 0.999) for s in (0, 10, 90, 990)] == pytest.approx([0.1, 0.55, 0.91, 0.991])
    assert warmup_decay(8990, 0.9) == 0.9


def test_ema_follows_the_closed_form_recursion_with_warmup_interval_and_cap():
    model = _tiny_linear(torch.bfloat16)
    ema = EMA(model, decay=0.3, update_every=2)
    assert set(ema.shadow) == {"weight"}
    assert ema.shadow["weight"].dtype == torch.float32 and ema.shadow["weight"].device.type == "cpu"
    expected = model.weight.detach().double()
    g = torch.Generator().manual_seed(0)
    for s in range(7):
        _perturb(model, g)
        assert ema.step(model) == (s % 2 == 0)
        if s % 2 == 0:  # d_eff = 0.1, 0.25, then capped at 0.3 (5/14 and 7/16 exceed it)
            d = min((1 + s) / (10 + s), 0.3)
            expected = d * expected + (1 - d) * model.weight.detach().double()
    torch.testing.assert_close(ema.shadow["weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.optimizer_steps == 7 and ema.num_updates == 4 and ema.last_decay == 0.3


def test_fp32_storage_keeps_small_updates_that_bf16_would_swallow():
    # docs/algorithms.md#ema: tracking 1.05 from 1.0 at decay 0.999, 100 updates past the warm-up:
    # 1.05 - 0.05 * 0.999^100 = 1.004757...; a bf16 EMA stays at exactly 1.0.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.999, update_every=1)
    ema.optimizer_steps = 10 ** 7  # past the warm-up: d_eff = d
    with torch.no_grad():
        model.weight.fill_(1.05)
    for _ in range(100):
        ema.step(model)
    assert ema.shadow["weight"].item() == pytest.approx(1.05 - 0.05 * 0.999 ** 100, rel=1e-6)


def test_applied_to_swaps_in_the_average_and_restores_exactly_even_on_error():
    model = _tiny_linear(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    _perturb(model, torch.Generator().manual_seed(1))
    ema.step(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied_to(model):
            assert torch.equal(model.weight, ema.shadow["weight"].to(torch.bfloat16))
            assert not torch.equal(model.weight, live["weight"])
            assert torch.equal(model.bias, live["bias"])  # frozen parameters are not touched
            raise RuntimeError("inside")
    for name, param in model.named_parameters():
        assert torch.equal(param, live[name])


def test_state_dict_round_trip_is_weights_only_and_resumes_bit_exactly(tmp_path):
    model = _tiny_linear()
    g = torch.Generator().manual_seed(2)
    ema = EMA(model, decay=0.95, update_every=2)
    for _ in range(3):
        _perturb(model, g)
        ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = EMA(_tiny_linear(), decay=0.95, update_every=2)  # other weights: everything comes from the file
    resumed.load_state_dict(load_weights_only(tmp_path / "ema.pt", source="test"), "ema.pt")
    for _ in range(3):
        _perturb(model, g)
        ema.step(model)
        resumed.step(model)
    assert resumed.optimizer_steps == ema.optimizer_steps == 6 and resumed.num_updates == ema.num_updates == 3
    assert torch.equal(resumed.shadow["weight"], ema.shadow["weight"])

    other = EMA(nn.Linear(3, 4), decay=0.95)
    with pytest.raises(ValueError, match="ema.pt"):
        other.load_state_dict(ema.state_dict(), "ema.pt")


def test_ema_flags_are_validated(tmp_path):
    base = ["--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--ema_decay"):
        parse_args(base + ["--ema_decay", "1.0"])
    with pytest.raises(ValueError, match="--ema_update_every"):
        parse_args(base + ["--ema_update_every", "0"])
    with pytest.raises(ValueError, match="--ema_device cpu needs whole parameters.*--ema_device gpu"):
        parse_args(base + ["--ema_decay", "0.9", "--ema_device", "cpu", "--deepspeed", str(ZERO3)])
    # ZeRO-3 with the sharded EMA (the default) is no longer refused.
    assert parse_args(base + ["--ema_decay", "0.9", "--deepspeed", str(ZERO3)])[0].ema_device == "gpu"
    args = parse_args(base)[0]
    assert args.ema_decay == 0.0 and args.ema_update_every == 1 and args.ema_device == "gpu"


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# The EMA run is the suite's bf16 run (issue 23 item 3): what users train in, through the real DeepSpeed ZeRO-2
# path, with training chunks of 1 sample against a rollout micro-batch of 4 rows (1 prompt x 4; the chunking whose
# bf16 forwards used to move the first chunk's ratio, docs/memory.md#bf16-and-the-first-chunks-ratio).
BF16_RUN = {"model_dtype": "bfloat16", "atrain_micro_batch_size": 1, "global_batch_size": 4}
# The bound on the first chunk's max |ratio - 1| = |exp(log_prob - old_log_prob) - 1| ~ |log_prob - old_log_prob|:
# the first chunk recomputes its recorded log-probs on bit-identical bf16 velocities (forwards of the same rows and
# row count, unchanged weights) with the same fp32 formula, so the two log-probs differ by fp32 rounding at most.
# The tiny run's per-step log-probs (the reference variant: a mean over C*h*w) are <= 0.92 in magnitude, so 8 ulps
# of 1 (8 * 2^-23 = 9.5e-7) bound it: 1e-6, 1% of the default --clip_range 1e-4, and 30x under the 3.2e-5 a chunk
# of 1 row deviated by when the rollout recorded in forwards of its whole micro-batch.
BF16_FIRST_CHUNK_BOUND = 1e-6


@pytest.fixture(scope="module")
def ema_run(process_group, tiny_paths, tmp_path_factory):
    """2 tiny steps in bf16 with --ema_decay 0.5, eval every step (a recording hook), checkpoints every step, a sample
    grid at step 2; records the weights (16-bit live and fp32 master) at each EMA update and what evaluation saw.
    The EMA is the default sharded one (--ema_device gpu) on the one-rank ZeRO-2 engine."""
    out = tmp_path_factory.mktemp("ema_run")
    # per_rollout: one optimizer step (so one EMA update) per GRPO step keeps the eval/update pairing below simple;
    # the EMA hook itself sits in optimizer_step, which every schedule goes through.
    trainer = build(tiny_paths, out, max_steps=2, ema_decay=0.5, eval_freq=1, reward_health_timeout=1,
                    judge_health_timeout=1, save_strategy="steps", save_steps=1, sample_image_freq=2,
                    optimizer_step_schedule="per_rollout", eval_before_train=False,  # evals paired with updates
                    **BF16_RUN)
    record = {"initial": {n: t.clone() for n, t in trainer.ema.full_shadow().items()}, "at_update": [],
              "masters": [], "eval": [], "grid": []}
    real_step = trainer.ema.step

    def recording_step(model):
        from deepspeed.utils import safe_get_full_fp32_param

        record["at_update"].append(_trained(model))
        record["masters"].append({n: safe_get_full_fp32_param(p).detach().clone()
                                  for n, p in model.named_parameters() if p.requires_grad})
        return real_step(model)

    def hook(model, step):
        record["eval"].append((step, _trained(model), {n: t.clone() for n, t in trainer.ema.full_shadow().items()}))
        return {}

    def capture_grid(self, step, images, prompts, rewards, columns, sources=None):
        record["grid"].append((step, images.clone(), list(prompts), rewards))

    trainer.ema.step = recording_step
    trainer.eval_hook = hook
    original = MetricsLogger.log_samples
    MetricsLogger.log_samples = capture_grid
    try:
        trainer.train()
    finally:
        MetricsLogger.log_samples = original
        trainer.close()
    return trainer, out, record


def test_trainer_ema_is_the_closed_form_recursion_of_its_optimizer_steps(ema_run):
    trainer, _, record = ema_run
    assert type(trainer.ema).__name__ == "ShardedEMA"  # the default --ema_device gpu
    assert len(record["masters"]) == 2  # one per applied optimizer step
    final = trainer.ema.full_shadow()
    for name, expected in record["initial"].items():
        e = expected.double()
        for s, weights in enumerate(record["masters"]):  # the fp32 master weights, not the bf16 copies
            d = min((1 + s) / (10 + s), 0.5)  # 0.1, then 2 / 11
            e = d * e + (1 - d) * weights[name].double()
        torch.testing.assert_close(final[name].double(), e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(record["initial"][n], final[n]) for n in record["initial"])


def test_evaluation_used_the_ema_and_the_live_weights_came_back(ema_run):
    trainer, _, record = ema_run
    assert [step for step, _, _ in record["eval"]] == [1, 2]
    # Evaluation after step k ran while the live weights were those of update k - 1 (taken right before it).
    for (step, seen, shadow), live in zip(record["eval"], record["at_update"]):
        for name, tensor in seen.items():
            assert torch.equal(tensor, shadow[name].to(tensor.dtype)), (step, name)
        assert any(not torch.equal(live[n], seen[n]) for n in seen)
    # The last evaluation came after the last update: the live weights it swapped out are back, bit for bit.
    final = _trained(trainer.model)
    for name, tensor in record["at_update"][-1].items():
        assert torch.equal(final[name], tensor)


def test_sample_grid_shows_the_ema_weights_on_the_rollouts_noise(ema_run, tiny_paths):
    from deepgen_rl.sampling import decode_images, rollout

    trainer, _, record = ema_run
    [(step, images, prompts, rewards)] = record["grid"]
    assert step == 2 and rewards is None and images.shape[0] == len(prompts)
    args, model = trainer.args, trainer.model
    unique = prompts[::args.rollout_n]

    def generate():
        # the rollout's per-sample streams of step ``step`` (keyed by global sample index: global_draws.py)
        generator = rollout_noise(args.seed, step - 1, 0, len(prompts), trainer.device)
        traj = rollout(model, unique, group_size=args.rollout_n, sampler=args.atrain_sde_sampler, eta=args.sde_eta,
                       logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
                       height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
                       init_same_noise=args.init_same_noise, generator=generator)
        return decode_images(model, traj.latents[:, -1], None)

    raw = generate()
    live = _trained(model)
    params = dict(model.named_parameters())
    with torch.no_grad():  # the EMA at the grid's time is the final one (the grid came after step 2's update)
        for name, shadow in trainer.ema.full_shadow().items():
            params[name].copy_(shadow.to(params[name].dtype))
        ema_images = generate()
        for name, tensor in live.items():
            params[name].copy_(tensor)
    torch.testing.assert_close(images, ema_images, rtol=0, atol=1e-6)
    assert not torch.allclose(images, raw, atol=1e-6)


def test_checkpoints_save_the_ema_and_resume_it_bit_exactly(ema_run, tiny_paths, tmp_path):
    trainer, out, _ = ema_run
    final = load_weights_only(out / "checkpoint-2" / "ema.pt", source="test")
    assert final["optimizer_steps"] == 2 and final["num_updates"] == 2
    for name, tensor in trainer.ema.full_shadow().items():
        assert torch.equal(final["shadow"][name], tensor)

    saved = load_weights_only(out / "checkpoint-1" / "ema.pt", source="test")
    resumed = build(tiny_paths, tmp_path, max_steps=2, ema_decay=0.5, optimizer_step_schedule="per_rollout",
                    **BF16_RUN)
    try:
        resumed.load(out / "checkpoint-1")
        assert resumed.ema.optimizer_steps == 1
        loaded = resumed.ema.full_shadow()
        for name, tensor in saved["shadow"].items():
            assert torch.equal(loaded[name], tensor)
        resumed.train()
    finally:
        resumed.close()
    redone = resumed.ema.full_shadow()
    for name, tensor in trainer.ema.full_shadow().items():  # step 2 redone from the checkpoint: the same average
        torch.testing.assert_close(redone[name], tensor, rtol=1e-5, atol=1e-8)
    # ... and the same step: its rollout, rewards and losses (one process, the same bf16 kernels: fp32 rounding).
    straight, again = trainer.state.log_history[-1], resumed.state.log_history[-1]
    assert straight["step"] == again["step"] == 2
    for key in ("reward/mean", "loss/policy", "loss/kl", "train/grad_norm", "policy/first_chunk_ratio_max_dev"):
        assert again[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-12), key


def test_bf16_run_has_finite_losses_and_a_first_chunk_ratio_of_one(ema_run):
    trainer, _, _ = ema_run
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.transformer.parameters())
    assert trainer.plan.train_micro_batch_size == 1 and trainer.args.rollout_micro_batch_size == 8
    steps = [record for record in trainer.state.log_history if "train/step_applied" in record]
    assert [record["step"] for record in steps] == [1, 2]
    for record in steps:
        assert record["train/step_applied"] == 1.0 and record["train/nonfinite_losses"] == 0.0, record
        for key in ("loss/policy", "loss/kl", "loss/total", "train/grad_norm", "reward/mean"):
            assert math.isfinite(record[key]), (key, record)
        assert record["policy/first_chunk_ratio_max_dev"] <= BF16_FIRST_CHUNK_BOUND, record


def test_converter_exports_the_ema_or_the_raw_weights(ema_run, tmp_path):
    _, out, _ = ema_run
    spec = importlib.util.spec_from_file_location("rlckpt", REPO_ROOT / "scripts" / "utils" / "rlckpt_to_sftckpt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--rl_checkpoint", str(out / "checkpoint-2"), "--weights", "ema",
                        "--output", str(tmp_path / "ema.pth")]) == 0
    summary = convert_rl_checkpoint(out / "checkpoint-2", tmp_path / "raw.pth", weights="raw")
    assert summary.has_ema and "--weights ema exports it" in summary.describe()
    ema_pth = torch.load(tmp_path / "ema.pth", weights_only=True)
    raw_pth = torch.load(tmp_path / "raw.pth", weights_only=True)
    shadow = load_weights_only(out / "checkpoint-2" / "ema.pt", source="test")["shadow"]
    assert set(ema_pth) == set(shadow) and set(shadow) <= set(raw_pth)
    for name, tensor in shadow.items():
        assert torch.equal(ema_pth[name], tensor)
    assert any(not torch.equal(ema_pth[n], raw_pth[n]) for n in shadow)
    with pytest.raises(FileNotFoundError, match="--weights raw"):
        convert_rl_checkpoint(tmp_path, tmp_path / "none.pth", weights="ema")


# ----- the sharded EMA (--ema_device gpu) on real ZeRO engines ---------------------------------------------------

def test_partition_maps_cut_whole_tensors_and_put_them_back():
    # Hand-made layouts: ZeRO-1/2 a flat buffer [a(5) pad(1) b(2x3)] + 2 padding cut into 2 partitions of 7; ZeRO-3
    # each parameter split on its own (a: 3 per rank, the last one padded; b: 3 per rank).
    whole = {"a": torch.arange(5.0), "b": torch.arange(10.0, 16.0).view(2, 3)}
    flat = GroupLayout(7, (ShardEntry("a", (5,), 0), ShardEntry("b", (2, 3), 6)), per_parameter=False)
    assert partition_of(whole, flat, 0).tolist() == [0, 1, 2, 3, 4, 0, 10]
    assert partition_of(whole, flat, 1).tolist() == [11, 12, 13, 14, 15, 0, 0]
    split = GroupLayout(6, (ShardEntry("a", (5,), 0, 3), ShardEntry("b", (2, 3), 3, 3)), per_parameter=True)
    assert partition_of(whole, split, 0).tolist() == [0, 1, 2, 10, 11, 12]
    assert partition_of(whole, split, 1).tolist() == [3, 4, 0, 13, 14, 15]
    for layout in (flat, split):  # rank pieces in chunks of 4 (not aligned to parameters) rebuild the whole tensors
        out = {"a": torch.full((5,), -1.0), "b": torch.full((6,), -1.0)}
        for rank in (0, 1):
            part = partition_of(whole, layout, rank)
            for lo in range(0, layout.partition_numel, 4):
                place_piece(out, layout, rank, lo, part[lo:lo + 4])
        assert torch.equal(out["a"], whole["a"]) and torch.equal(out["b"].view(2, 3), whole["b"])


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """One 2-rank torchrun run of tests/scripts/ema_shards_run.py (ZeRO-2, then ZeRO-3): {stage: [rank 0, rank 1]
    results}, and the folder holding the ema.pt files it saved."""
    import os

    out = tmp_path_factory.mktemp("ema_shards")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = torchrun(2, [str(REPO_ROOT / "tests" / "scripts" / "ema_shards_run.py"), "--out", str(out)], env, 500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {stage: [torch.load(out / f"result_zero{stage}_rank{r}.pt", weights_only=False) for r in (0, 1)]
            for stage in (2, 3)}, out


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_ema_is_the_float64_ema_of_the_fp32_master_weights(shard_run, stage):
    results, _ = shard_run
    trained = 7 * 13 + 13 + 13 * 11 + 11 + 2 * 11  # the tiny net's inp, mid and norm; its last layer is frozen
    for rank, result in enumerate(results[stage]):
        assert result["world"] == 2 and result["optimizer_steps"] == result["num_updates"] == ema_shards_run.STEPS
        assert set(result["full"]) == set(result["reference"]) and not any("frozen" in n for n in result["full"])
        for name, expected in result["reference"].items():
            torch.testing.assert_close(result["full"][name].double(), expected, rtol=0, atol=1e-6)
        # Each rank holds about half: its share of the trained parameters (plus alignment padding), not a copy.
        assert trained / 2 <= result["shard_numel"] < trained / 2 + 16
        # ZeRO-2: the two AdamW groups (matrices, 1-D); ZeRO-3: the matrices in two sub-groups, then the 1-D ones.
        assert result["partitions"] == (2 if stage == 2 else 3)
        # The saving gather assembles the whole tensors on rank 0 only.
        assert (set(result["full_rank0_only"]) == set(result["full"])) == (rank == 0)
    for name, tensor in results[stage][0]["full"].items():
        assert torch.equal(tensor, results[stage][1]["full"][name])


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_ema_saves_whole_tensors_and_resumes_bit_exactly(shard_run, stage):
    results, out = shard_run
    saved = load_weights_only(out / f"ema_zero{stage}.pt", source="test")  # the host copy's ema.pt format
    assert saved["optimizer_steps"] == saved["num_updates"] == ema_shards_run.RESUME_AT + 1
    assert {n: tuple(t.shape) for n, t in saved["shadow"].items()} == {
        n: tuple(t.shape) for n, t in results[stage][0]["full"].items()}
    for result in results[stage]:
        for name, tensor in saved["shadow"].items():
            assert tensor.dtype == torch.float32 and torch.equal(result["loaded"][name], tensor)
        # Resumed after step RESUME_AT, then stepped on the same master weights: the same bits as never stopping.
        for name, tensor in result["full"].items():
            assert torch.equal(result["resumed_full"][name], tensor), name
        assert result["resumed_updates"] == ema_shards_run.STEPS


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_ema_is_swapped_in_for_evaluation_and_the_live_weights_come_back(shard_run, stage):
    results, _ = shard_run
    for result in results[stage]:
        full = result["full"]
        assert any(not torch.equal(result["live"][n], full[n].to(torch.bfloat16)) for n in full)
        for name, tensor in full.items():
            assert torch.equal(result["inside"][name], tensor.to(torch.bfloat16)), name
            assert torch.equal(result["after"][name], result["live"][name]), name
        # The forward inside ran on the EMA weights: the same net rebuilt here with them (its frozen layer as built).
        net = ema_shards_run.tiny_net()
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name in full:
                    param.copy_(full[name].to(torch.bfloat16))
            expected = net(torch.ones(1, 7, dtype=torch.bfloat16)).float()
        torch.testing.assert_close(result["forward_inside"], expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_ema_saved_on_two_ranks_resumes_on_one(shard_run, process_group, stage):
    """Re-sharding: ema.pt saved by the 2-rank run (under either stage) loads into a one-rank engine of this stage."""
    from deepgen_rl.trainer.ema_shards import ShardedEMA

    _, out = shard_run
    engine = ema_shards_run.engine_for(ema_shards_run.tiny_net(), stage)
    ema = ShardedEMA(engine.optimizer, engine.module, decay=ema_shards_run.DECAY)
    for saved_stage in (2, 3):
        path = out / f"ema_zero{saved_stage}.pt"
        saved = load_weights_only(path, source="test")
        ema.load_state_dict(saved, str(path))
        assert ema.optimizer_steps == ema_shards_run.RESUME_AT + 1
        assert sum(t.numel() for t in ema.shards) >= sum(t.numel() for t in saved["shadow"].values())  # all here
        loaded = ema.full_shadow()
        for name, tensor in saved["shadow"].items():
            assert torch.equal(loaded[name], tensor), name
        with ema.applied_to(engine.module):
            inside = ema_shards_run.gathered_params(engine, stage)
        for name, tensor in saved["shadow"].items():
            assert torch.equal(inside[name], tensor.to(torch.bfloat16)), name

"""The trainer on one process (gloo group of size 1, DeepSpeed ZeRO-2 on CPU), built by the entry point's own
``build_trainer``: seeded golden values, exact resume after SIGTERM, skipped steps on a non-finite loss,
failed rewards masked out of the advantages.

For golden values that do not hinge on last-bit differences between CPUs, these runs score images with a
smooth stand-in reward (mean brightness of the 8-bit image, registered under the quick-start dataset's reward
name): JPEG sizes jump by whole bytes when one pixel rounds differently.
"""

from __future__ import annotations

import hashlib
import logging
import signal

import numpy as np
import pytest
import torch

from deepgen_rl import grpo_deepgen
from deepgen_rl.config import parse_args
from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.reward_step import RewardStep
from deepgen_rl.trainer import grpo_trainer
from tests.trainer_utils import ZERO2, tiny_run_flags

METRIC_KEYS = ("reward/mean", "reward/std", "loss/kl", "loss/sft", "train/grad_norm", "adv/std")
GOLDEN_KEYS = METRIC_KEYS + ("loss/policy", "policy/clip_fraction")

# Tolerances of the golden comparison, from measured spread (torch 2.13.0 CPU, this tiny run):
# - thread count: 1 vs 2 threads bit-identical; 4 threads up to rel 5e-5 (reward/std) and 1.2e-5 (grad_norm).
#   The run is pinned to one thread anyway (`straight_run`).
# - CPU to CPU: up to rel 3.5e-5 on loss/kl and grad_norm, but rel 2.1e-4 on reward/std (0.0036616 vs 0.0036624).
#   The reward is the mean of an 8-bit image, so a pixel that rounds the other way on another CPU moves one image's
#   reward by a whole quantum 1 / (255 * 64 * 64 * 3) = 3.2e-7, and the step's reward std (~0.003) by about as much:
#   that is 1e-4 relative per flipped pixel. Reward statistics therefore get an absolute tolerance of 8 quanta
#   (the measured gap was 2.4), everything else rel 2e-4 (~6x the measured CPU-to-CPU spread).
# - Near-zero values, where a relative tolerance means nothing: loss/policy is -mean(A * ratio) with ratio 1 (one
#   optimizer step per rollout) and GDPO advantages of batch mean 0, so its golden value is fp32 rounding of a
#   zero-mean sum (measured +-2e-9, sign and size vary with the summation order). Absolute 1e-6: 500x that noise,
#   1e-6 of the unit advantage scale, so an advantage mean or a ratio off by 1e-6 fails it. policy/clip_fraction
#   is a fraction of samples (one flipped sample moves it by >= 1/32): golden 0, absolute 1e-9, i.e. exact.
PEAK_TFLOPS = 0.5  # --gpu_peak_tflops of the straight run: a CPU has no default, so MFU is logged only when given
PIXEL_QUANTUM = 1.0 / (255 * 64 * 64 * 3)
GOLDEN_ABS_TOLERANCE = {"reward/mean": 8 * PIXEL_QUANTUM, "reward/std": 8 * PIXEL_QUANTUM, "loss/policy": 1e-6,
                        "policy/clip_fraction": 1e-9}
GOLDEN_REL_TOLERANCE = 2e-4

# Golden values of the straight run (the `straight_run` fixture: 4 steps, --optimizer_step_schedule per_rollout,
# seed 0, lr 1e-3 linear decay, CPS-SDE,
# GDPO, beta 5e-7 v-based KL, SFT-aux 1e-4 on the shipped config), recorded on torch 2.13.0 CPU. After an INTENDED
# change of the training semantics, rerun `pytest tests/test_trainer_inprocess.py -k golden`: the failure message
# prints each step's new values (`got`); paste them here. The first step's loss/kl is 0 by construction
# (policy == reference before the first update). Re-derived when every draw became keyed by global position
# (issue 29, docs/reproducibility.md): the prompts and noise changed, so every value did; step 1's reward mean is
# recomputed independently from those keyed streams in `test_golden_first_step_is_the_global_streams`.
GOLDEN = {
    1: {"reward/mean": 0.5015631318092346, "reward/std": 0.0017418250208720565, "loss/kl": 0.0,
        "loss/sft": 6.29267692565918, "train/grad_norm": 0.02271311543881893, "adv/std": 0.9353082776069641,
        "loss/policy": -7.450580596923828e-09, "policy/clip_fraction": 0.0},
    2: {"reward/mean": 0.5035175681114197, "reward/std": 0.0031353163067251444, "loss/kl": 51.64785863955816,
        "loss/sft": 6.269577503204346, "train/grad_norm": 0.027176475152373314, "adv/std": 0.9353095889091492,
        "loss/policy": 0.0, "policy/clip_fraction": 0.0},
    3: {"reward/mean": 0.5035275816917419, "reward/std": 0.002958707744255662, "loss/kl": 71.49243791525562,
        "loss/sft": 6.162633895874023, "train/grad_norm": 0.03772202134132385, "adv/std": 0.9353095293045044,
        "loss/policy": 0.0, "policy/clip_fraction": 0.0},
    4: {"reward/mean": 0.5033991932868958, "reward/std": 0.0019589525181800127, "loss/kl": 88.34207382674019,
        "loss/sft": 6.253734588623047, "train/grad_norm": 0.029894068837165833, "adv/std": 0.9353083372116089,
        "loss/policy": 0.0, "policy/clip_fraction": 0.0},
}


class Brightness:
    """r = mean 8-bit pixel value / 255 (smooth in the model's output)."""

    name = "jpeg_compressibility"
    score_range = (0.0, 1.0)
    service = "in-process test reward"

    def __init__(self, fail_rows=()):
        self.fail_rows = set(fail_rows)

    def check_ready(self):
        pass

    def score(self, images, prompts, group_ids):
        values, errors = [], []
        for row, image in enumerate(images):
            if row in self.fail_rows:
                values.append(None), errors.append("test failure")
            else:
                values.append(float(np.asarray(image, dtype=np.float64).mean() / 255.0)), errors.append(None)
        return RewardScores(values=values, errors=errors)

    def close(self):
        pass


def build(tiny_paths, out, reward=None, **overrides):
    flags = tiny_run_flags(tiny_paths, out, **{"deepspeed": str(ZERO2), "learning_rate": 1e-3, **overrides})
    args, *groups = parse_args(flags)
    trainer = grpo_deepgen.build_trainer(args, *groups, "cpu")
    trainer.reward_step.close()
    trainer.reward_step = RewardStep({"jpeg_compressibility": reward or Brightness()})
    return trainer


def digest(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().float().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def history(trainer) -> dict[int, dict]:
    return {record["step"]: record for record in trainer.state.log_history}


@pytest.fixture(scope="module")
def straight_run(process_group, tiny_paths, tmp_path_factory):
    # One thread: the golden values then do not depend on how many cores the machine has (see the tolerances).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = build(tiny_paths, tmp_path_factory.mktemp("straight"), max_steps=4, optimizer_step_schedule="per_rollout",
                    gpu_peak_tflops=PEAK_TFLOPS)
    try:
        trainer.train()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    return history(trainer)


def test_golden_values(straight_run):
    for step, expected in GOLDEN.items():
        got = {key: straight_run[step][key] for key in GOLDEN_KEYS}
        for key in GOLDEN_KEYS:
            tolerance = pytest.approx(expected[key], rel=GOLDEN_REL_TOLERANCE, abs=GOLDEN_ABS_TOLERANCE.get(key, 1e-9))
            assert got[key] == tolerance, f"step {step} {key}: got {got[key]!r}; all of step {step}: {got}"


def test_golden_first_step_is_the_global_streams(process_group, tiny_paths, tmp_path):
    # Step 1 of the golden run recomputed outside the trainer loop: its prompts are the first 2 of the run's
    # GLOBAL prompt list drawn as two ranks would draw them (rank 0 and rank 1, one prompt each), its noise the
    # per-sample streams keyed by global sample index, rolled out with the initial weights and scored by the
    # golden run's Brightness reward. Its mean is the golden step-1 reward: the golden values are those of the
    # world-size-invariant draws (docs/reproducibility.md), not whatever the loop happened to produce.
    from deepgen_rl.data import PromptSampler
    from deepgen_rl.rewards.reward_step import images_to_pil
    from deepgen_rl.sampling import decode_images, rollout
    from deepgen_rl.trainer.global_draws import rollout_noise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the golden run
    trainer = build(tiny_paths, tmp_path / "run", max_steps=4, optimizer_step_schedule="per_rollout")
    try:
        args, sampler = trainer.args, trainer.prompt_sampler
        assert trainer.plan.prompts_per_rank == 2
        prompts = [PromptSampler(sampler.config, seed=args.seed, rank=r).sample(1)[0].prompt for r in range(2)]
        trainer.model.eval()
        trajectory = rollout(trainer.model, prompts, group_size=args.rollout_n, sampler=args.atrain_sde_sampler,
                             eta=args.sde_eta, logprob_variant=args.logprob_variant,
                             num_inference_steps=args.num_inference_steps, height=args.image_height,
                             width=args.image_width, cfg_scale=args.rollout_cfg_scale,
                             init_same_noise=args.init_same_noise, micro_batch_size=args.rollout_micro_batch_size,
                             generator=rollout_noise(args.seed, 0, 0, 2 * args.rollout_n, trainer.device))
        images = decode_images(trainer.model, trajectory.latents[:, -1], args.vae_decode_micro_batch_size)
        scores = Brightness().score(images_to_pil(images), trajectory.prompts, list(range(len(images)))).values
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    assert float(np.mean(scores)) == pytest.approx(GOLDEN[1]["reward/mean"], abs=GOLDEN_ABS_TOLERANCE["reward/mean"])


def test_full_sde_window_and_serial_rewards_reproduce_the_golden_values(process_group, tiny_paths, tmp_path):
    # A window covering all T = 6 steps is today's full-trajectory run, and the serial reward path (the golden run
    # streams, the default) gives the same rewards: the first two golden steps, unchanged.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = build(tiny_paths, tmp_path, max_steps=2, optimizer_step_schedule="per_rollout", sde_window_size=6,
                    stream_rewards=False)
    try:
        trainer.train()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    records = history(trainer)
    for step in (1, 2):
        for key in GOLDEN_KEYS:
            tolerance = pytest.approx(GOLDEN[step][key], rel=GOLDEN_REL_TOLERANCE,
                                      abs=GOLDEN_ABS_TOLERANCE.get(key, 1e-9))
            assert records[step][key] == tolerance, (step, key, records[step][key])
        assert "time/reward_wait" not in records[step] and "time/rewards" in records[step]


def test_eval_before_train_without_evaluation_is_skipped_with_a_log_line(caplog):
    from types import SimpleNamespace

    trainer = grpo_trainer.DeepGenGRPOTrainer.__new__(grpo_trainer.DeepGenGRPOTrainer)  # only what the call reads
    trainer.eval_hook, trainer.rank = None, 0
    for eval_freq, reason in ((0, "(--eval_freq 0)"), (5, "(no eval dataset config or judge: see the warning above)")):
        trainer.args = SimpleNamespace(eval_freq=eval_freq)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=grpo_trainer.__name__):
            trainer._eval_before_train(metrics_logger=None)
        assert f"--eval_before_train: skipped, evaluation is off for this run {reason}" in caplog.text


def test_first_chunk_ratio_is_one_and_each_step_applies(straight_run):
    for record in straight_run.values():
        assert record["policy/first_chunk_ratio_max_dev"] <= 1e-6
        assert record["train/step_applied"] == 1.0
        assert "time/reward_wait" in record and "time/decode" not in record  # --stream_rewards (default)


def test_sigterm_checkpoints_and_resume_repeats_the_run(straight_run, tiny_paths, tmp_path):
    out = tmp_path / "interrupted"
    first = build(tiny_paths, out, max_steps=4, optimizer_step_schedule="per_rollout")
    original = first.reward_phase

    def reward_then_sigterm(batch):
        if first.state.global_step == 1:  # during step 2: abandoned at the next safe point, step 1 checkpointed
            signal.raise_signal(signal.SIGTERM)
        return original(batch)

    first.reward_phase = reward_then_sigterm
    try:
        state = first.train()
    finally:
        first.close()
    assert state.global_step == 1
    assert (out / "checkpoint-1" / "latest").is_file() and not (out / "checkpoint-2").exists()
    assert signal.getsignal(signal.SIGTERM) is not first  # handler restored (no stray handler left)

    # Step 2's prompt draw and RNG use were rewound, so the resumed run redoes step 2 exactly.
    second = build(tiny_paths, out, max_steps=4, optimizer_step_schedule="per_rollout")
    try:
        second.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    finally:
        second.close()
    resumed = {**history(first), **history(second)}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key in METRIC_KEYS + ("train/lr",):
            assert resumed[step][key] == pytest.approx(straight_run[step][key], rel=1e-6, abs=1e-12), (step, key)


def test_nonfinite_loss_skips_the_optimizer_step(process_group, tiny_paths, tmp_path, monkeypatch):
    trainer = build(tiny_paths, tmp_path, max_steps=3, optimizer_step_schedule="per_rollout")
    real_objective = grpo_trainer.policy_chunk_objective

    def nan_on_step_two(*args, **kwargs):
        out = real_objective(*args, **kwargs)
        if trainer.state.global_step == 1:
            return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})
        return out

    monkeypatch.setattr(grpo_trainer, "policy_chunk_objective", nan_on_step_two)
    try:
        for _ in range(3):
            before = digest(trainer.model)
            metrics, _, _ = trainer.training_step()
            trainer.state.global_step += 1
            changed = before != digest(trainer.model)
            if trainer.state.global_step == 2:
                assert metrics["train/skipped"] == 1.0 and metrics["train/nonfinite_losses"] > 0
                assert not changed, "a NaN loss reached the weights"
                lr_at_skip = metrics["train/lr"]
            else:
                assert metrics["train/skipped"] == 0.0 and changed
        # The skipped step did not advance the LR schedule: step 3 runs at step 2's learning rate.
        assert metrics["train/lr"] == pytest.approx(lr_at_skip)
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    finally:
        trainer.close()


def test_failed_rewards_are_masked_and_an_all_failed_step_is_skipped(process_group, tiny_paths, tmp_path):
    # 2 prompts x 4 images; rows 0 and 5 fail (one per group).
    trainer = build(tiny_paths, tmp_path, max_steps=2, reward=Brightness(fail_rows={0, 5}))
    try:
        batch = trainer.rollout_phase(0)
        trainer.decode_phase(batch)
        rewards = trainer.reward_phase(batch)
        advantages, metrics = trainer.advantage_phase(rewards)
        assert rewards.failed.tolist() == [True, False, False, False, False, True, False, False]
        assert metrics["reward/failed_samples"] == 2.0 and metrics["reward/jpeg_compressibility/failed"] == 2.0
        assert advantages.valid.tolist() == (~rewards.failed).tolist()
        assert advantages.advantages[rewards.failed].abs().sum() == 0.0
        # The valid samples' advantages are exactly those of the batch without the failed ones (GDPO, one
        # reward: group z-score then batch z-score, unbiased stds, +1e-4 as docs/algorithms.md#advantages).
        r = rewards.scores[:, 0].double()
        z = torch.zeros(8, dtype=torch.float64)
        for rows in ([1, 2, 3], [4, 6, 7]):
            g = r[rows]
            z[rows] = (g - g.mean()) / (g.std() + 1e-4)
        valid = ~rewards.failed
        expected = (z[valid] - z[valid].mean()) / (z[valid].std() + 1e-4)
        assert torch.allclose(advantages.advantages[valid].double(), expected.clamp(-5, 5), atol=1e-5)

        trainer.reward_step = RewardStep({"jpeg_compressibility": Brightness(fail_rows=set(range(8)))})
        before = digest(trainer.model)
        metrics, _, _ = trainer.training_step()
        assert metrics["train/skipped"] == 1.0 and metrics["reward/failed_samples"] == 8.0
        assert digest(trainer.model) == before
    finally:
        trainer.close()


def test_eval_hook_every_eval_freq_steps_and_a_failing_eval_does_not_stop_training(process_group, tiny_paths,
                                                                                   tmp_path):
    # No judge runs here: a short health timeout keeps the start-up probe (whose hook is replaced below) brief.
    trainer = build(tiny_paths, tmp_path, max_steps=2, eval_freq=1, judge_health_timeout=1)
    calls = []

    def hook(model, step):
        calls.append(step)
        if step == 2:
            raise RuntimeError("judge went away")
        return {"eval/unigenbench/overall": 0.25}

    trainer.eval_hook = hook
    try:
        trainer.train()
    finally:
        trainer.close()
    records = history(trainer)
    assert calls == [0, 1, 2]  # --eval_before_train (default): the step-0 baseline, once
    assert records[0]["eval/unigenbench/overall"] == 0.25 and "reward/mean" not in records[0]
    assert records[1]["eval/unigenbench/overall"] == 0.25 and "time/eval" in records[1]
    assert records[2]["eval/failed"] == 1.0 and records[2]["train/step_applied"] == 1.0


def test_perf_metrics_follow_the_phase_timers(straight_run):
    """--gpu_peak_tflops PEAK_TFLOPS (the straight run): perf/<phase>_tflops = the phase's FLOPs (counted once at
    start-up) / its seconds, its MFU against the peak, images/s/GPU = N / time/step."""
    implied = {}
    for step, record in straight_run.items():
        for phase in ("rollout", "train", "step"):
            tflops = record[f"perf/{phase}_tflops"]
            assert tflops > 0 and record[f"perf/{phase}_mfu"] == pytest.approx(tflops / PEAK_TFLOPS, rel=1e-12)
            seconds = record["time/step" if phase == "step" else f"time/{phase}"]
            implied.setdefault(phase, []).append(tflops * seconds)
        assert "perf/decode_tflops" not in record  # --stream_rewards: the decode runs in the rollout's timer
        assert record["perf/images_per_s_per_gpu"] == pytest.approx(8 / record["time/step"], rel=1e-12)
    for phase, values in implied.items():  # the same shapes every step: the same FLOPs
        assert max(values) == pytest.approx(min(values), rel=1e-9), phase


@pytest.mark.parametrize("flags", [{}, {"use_lora": True, "gradient_checkpointing": True, "rollout_cfg_scale": 3.0}],
                         ids=["defaults", "lora-checkpointing-cfg"])
def test_counted_step_flops_match_what_a_step_runs(process_group, tiny_paths, tmp_path, flags):
    """The perf/ count (a meta copy, at the first rollout's text length) against FlopCounterMode around one real
    CPU step of the tiny model (reference schedule: its KL step re-runs every chunk; under LoRA the reference runs
    with the adapters off; CFG doubles the DiT rows; checkpointing recomputes in backward). Attention runs the math path
    here, whose matmuls the counter sees (the CPU's fused kernel it does not count). The rollout (prompt encoding,
    DiT, decode) is exact. SFT-aux is off here: the count encodes its captions at the first rollout's prompt length
    (the captions are not known at start-up), and on the tiny model, whose LLM is most of an SFT-aux item's cost,
    that approximation alone moved the train phase by 6% when the step's prompt draw changed (0.2% of a real-size
    step: docs/compute.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from deepgen_rl.perf.mfu import conditioning_tokens

    trainer = build(tiny_paths, tmp_path, max_steps=1, optimizer_step_schedule="reference", sftaux_coef=0.0, **flags)
    measured = {}
    try:
        with sdpa_kernel(SDPBackend.MATH):
            counter = FlopCounterMode(display=False)
            with counter:
                batch = trainer.rollout_phase(0)
            measured["rollout"] = counter.get_total_flops()
            advantages, _ = trainer.advantage_phase(trainer.reward_phase(batch))
            counter = FlopCounterMode(display=False)
            with counter:
                trainer.train_phase(batch, advantages, 0)
            measured["train"] = counter.get_total_flops()
    finally:
        trainer.close()
    assert trainer.perf.metrics({}, conditioning_tokens(batch)) == {}  # no timings given: no rates
    counted = trainer.perf.perf.flops
    assert set(counted) == {"rollout", "train"}  # --stream_rewards: the decode runs in the rollout's timer
    assert counted["rollout"] == measured["rollout"]
    assert counted["train"] == pytest.approx(measured["train"], rel=0.02)

"""GRPO learns: on the tiny model with the local jpeg_compressibility reward, 30 seeded steps raise the reward,
and the same run at learning rate 0 does not.

The two runs go through the real entry point code (tests/trainer_utils.py) as two single-process jobs side by
side. "Raise" is measured two ways: the mean reward of the training batches (last 5 steps vs first 5), and the
reward of a FIXED set of samples (the quick-start prompts x rollout_n, one fixed generator) before vs after
training: common random numbers cancel sampling noise, so that difference is the weights' doing only.

Thresholds come from measurements of exactly these settings (the tiny model of deepgen_rl/model/tiny.py, whose
decoder tracks the latent; 4 sampler steps, 3 trained, groups of 8, 32 images per step, lr 2e-3 constant):
  lr = 0     per-step std of reward/mean 0.0005-0.0007 and last-5 minus first-5 within +-0.0005 (7 runs:
             training seeds 0-4 x tiny-model seed 0, and tiny-model seeds 1, 2);
  lr = 2e-3  last-5 minus first-5 +0.0104 / +0.0108 / +0.0132 / +0.0119 / +0.0107 (training seeds 0-4, tiny
             seed 0), +0.0121 / +0.0193 (tiny seeds 1 / 2); fixed-noise gain +0.011 to +0.023 on the same runs.
These runs use the default --optimizer_step_schedule (since issue 13: reference, 7 AdamW steps per rollout here);
the figures above were measured with one step per rollout (per_rollout). Under reference, training seed 0 / tiny
seed 0 gave last-5 minus first-5 +0.0104 and fixed-noise gain +0.0106 (per_rollout on the same run: +0.0103 /
+0.0121), so the thresholds below hold with a margin of 2x there too.
MIN_GAIN (0.005) is under half the smallest measured gain and ~8x the lr = 0 per-step noise; the test also
re-derives the noise from its own lr = 0 run and asks for a gain of at least NOISE_MULTIPLE times it.
MAX_FROZEN_DRIFT (0.002) is ~4x the largest lr = 0 drift seen (and ~5 standard deviations of a difference of
two 5-step means at per-step std 0.0006).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from tests.trainer_utils import REPO_ROOT, run_env, tiny_run_flags

STEPS = 30
LEARNING_RUN = {"num_inference_steps": 4, "timestep_fraction": 1.0, "rollout_n": 8, "global_batch_size": 32,
                "rollout_micro_batch_size": 32, "atrain_micro_batch_size": 32, "lr_scheduler_type": "constant",
                "max_steps": STEPS, "seed": 0}
LEARNING_RATE = 2e-3
MIN_GAIN = 0.005
NOISE_MULTIPLE = 5.0
MAX_FROZEN_DRIFT = 0.002
TIMEOUT_S = 300


def _window_gain(curve: list[float], width: int = 5) -> float:
    """Mean of the last ``width`` values minus the mean of the first ``width``."""
    return sum(curve[-width:]) / width - sum(curve[:width]) / width


def test_reward_rises_with_learning_and_not_at_lr_zero(tiny_paths, tmp_path):
    jobs = {}
    for name, lr in (("learn", LEARNING_RATE), ("frozen", 0.0)):
        dump = tmp_path / f"{name}.json"
        flags = tiny_run_flags(tiny_paths, tmp_path / name, learning_rate=lr, **LEARNING_RUN)
        command = [sys.executable, str(REPO_ROOT / "tests" / "trainer_utils.py"), "--reward_dump", str(dump), *flags]
        jobs[name] = (dump, subprocess.Popen(command, env=run_env(tiny_paths), cwd=REPO_ROOT, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    try:
        for name, (dump, process) in jobs.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
            results[name] = json.loads(dump.read_text())
    finally:
        for _, process in jobs.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    learn, frozen = results["learn"], results["frozen"]
    assert len(learn["curve"]) == len(frozen["curve"]) == STEPS
    assert learn["before"] == frozen["before"]  # same seed, same initial weights

    # Learning rate 0: the weights never move, so the fixed-noise reward is exactly the same number, and the
    # batch reward only fluctuates (no trend).
    assert frozen["after"] == frozen["before"]
    noise = statistics.pstdev(frozen["curve"])
    frozen_drift = _window_gain(frozen["curve"])
    assert abs(frozen_drift) < MAX_FROZEN_DRIFT, (frozen_drift, frozen["curve"])

    threshold = max(MIN_GAIN, NOISE_MULTIPLE * noise)
    gain = learn["after"] - learn["before"]
    assert gain > threshold, f"fixed-noise reward {learn['before']:.5f} -> {learn['after']:.5f} (noise {noise:.5f})"
    curve_gain = _window_gain(learn["curve"])
    assert curve_gain > threshold, (curve_gain, noise, learn["curve"])

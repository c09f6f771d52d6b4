"""The reward-hacking alarms on synthetic series (no model): the robust z-score, patience and direction of the
drift alarm; the divergence alarm's trends; best_checkpoint.json through saves, rotation and resume; warn / stop;
the flags. Expected values are worked out in each test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deepgen_rl.monitor import MonitorSettings, RewardHackingMonitor, held_out_score
from deepgen_rl.monitor.alarms import DivergenceAlarm, DriftAlarm, robust_location_scale, slope
from deepgen_rl.monitor.best import BEST_CHECKPOINT_NAME, best_saved, read_best
from deepgen_rl.monitor.stats import STATS


def test_robust_location_scale_ignores_an_outlier_and_has_floors():
    # median 3; |x - 3| = 2, 1, 0, 1, 97 -> MAD 1 -> 1.4826 (the 100 does not move it)
    assert robust_location_scale([1, 2, 3, 4, 100]) == (3.0, pytest.approx(1.4826))
    # constant baseline: MAD 0 -> the relative floor 2% of |median|
    assert robust_location_scale([2.0, 2.0, 2.0]) == (2.0, pytest.approx(0.04))
    assert robust_location_scale([0.0, 0.0]) == (0.0, pytest.approx(1e-6))  # the absolute floor


def test_slope_is_least_squares():
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert slope([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)  # sum(xc * yc) / sum(xc^2) = 1 / 5
    assert math.isnan(slope([1], [1]))


def _drift(series: list[float], baseline=5, z=6.0, patience=3):
    alarm = DriftAlarm(baseline, z, patience)
    fired = []
    for step, value in enumerate(series, start=1):
        _, new = alarm.update(step, {"brightness": value})
        fired += new
    return alarm, fired


def test_drift_alarm_fires_after_patience_naming_direction_and_start():
    # baseline 1.0, 1.1, 0.9, 1.0, 1.05: median 1.0, MAD 0.05 -> scale 1.4826 x 0.05 = 0.0741 (> floor 0.02)
    baseline = [1.0, 1.1, 0.9, 1.0, 1.05]
    alarm, fired = _drift(baseline + [1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    # step 8: trailing mean (1 + 1 + 3) / 3 = 1.667 -> z = 0.667 / 0.0741 = 9.0 > 6: streak from step 8;
    # patience 3 -> fires at step 10
    assert [(a.kind, a.signal, a.direction, a.began_step, a.step) for a in fired] == [
        ("drift", "brightness", "up", 8, 10)]
    assert alarm.z_history[2] == (8, {"brightness": pytest.approx((5 / 3 - 1.0) / (1.4826 * 0.05))})
    # step 6: (1.0 + 1.05 + 0.2) / 3 = 0.75, z -3.4 (inside); step 7: (1.05 + 0.2 + 0.2) / 3 = 0.483, z -7.0:
    # streak from step 7, fires at step 9
    _, down = _drift(baseline + [0.2] * 5)
    assert [(a.direction, a.began_step, a.step) for a in down] == [("down", 7, 9)]


def test_drift_alarm_needs_consecutive_steps_and_can_be_off():
    baseline = [1.0, 1.1, 0.9, 1.0, 1.05]
    # a spike lifts the trailing mean for 3 steps (patience 4): a streak of 3, then back -> no alarm
    _, fired = _drift(baseline + [1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0], patience=4)
    assert fired == []
    _, off = _drift(baseline + [5.0] * 10, z=0.0)
    assert off == []


def test_drift_alarm_stays_silent_on_stationary_noise():
    rng = np.random.default_rng(0)
    series = list(0.8 + 0.01 * rng.standard_normal(300))
    _, fired = _drift(series, baseline=10)
    assert fired == []


def test_divergence_alarm_needs_reward_up_and_held_out_down():
    def run(reward_slope: float, evals: list[float], window: int = 3):
        alarm = DivergenceAlarm(window, "eval/x")
        fired = []
        for step in range(1, 31):
            alarm.reward(step, 0.5 + reward_slope * step)
            if step % 10 == 0:
                out = alarm.evaluation(step, evals[step // 10 - 1])
                fired += [out] if out else []
        return fired

    fired = run(0.01, [0.6, 0.5, 0.4])
    assert [(a.kind, a.signal, a.began_step, a.step) for a in fired] == [("divergence", "eval/x", 10, 30)]
    assert "slope -0.01/step" in fired[0].detail
    assert run(0.01, [0.4, 0.5, 0.6]) == []  # both up: learning
    assert run(-0.01, [0.6, 0.5, 0.4]) == []  # both down: failing, not hacking
    assert run(0.01, [0.6, 0.5, 0.4], window=0) == []
    assert run(0.01, [0.6, 0.5, 0.4], window=4) == []  # three evaluations only
    # a fall within evaluation noise: fitted drop 0.5 - 0.495 = 0.005 < 2% of the mean 0.4975 (0.00995)
    assert run(0.01, [0.5, 0.4975, 0.495]) == []
    assert len(run(0.01, [0.5, 0.495, 0.485])) == 1  # drop 0.015 > 0.00987


def test_held_out_score_overall_and_named():
    metrics = {"eval/a/overall": 0.4, "eval/b/overall": 0.6, "eval/a/Attribute": 0.9, "reward/mean": 3.0}
    assert held_out_score(metrics, "overall") == pytest.approx(0.5)
    assert held_out_score(metrics, "eval/a/Attribute") == 0.9
    assert held_out_score(metrics, "a/Attribute") == 0.9
    assert held_out_score({"reward/mean": 1.0}, "overall") is None


def _stat_sums(value: float) -> dict:
    return {name: (value * 4, 4) for name in STATS}


def _monitor(tmp_path: Path, **settings) -> RewardHackingMonitor:
    return RewardHackingMonitor(MonitorSettings(**{"baseline_steps": 3, "z": 6.0, "patience": 2, "eval_window": 2,
                                                   "eval_metric": "eval/x", **settings}), tmp_path, is_main=True)


def _live_run(monitor: RewardHackingMonitor, steps: int = 8) -> list[dict]:
    """Statistics at 0.5 for 4 steps, then 2.0; reward rising; held-out 0.7 at step 2, 0.6 at 4, 0.3 at 6."""
    history = []
    for step in range(1, steps + 1):
        metrics = {"reward/mean": 0.1 * step}
        if step in (2, 4, 6):
            metrics["eval/x"] = {2: 0.7, 4: 0.6, 6: 0.3}[step]
        metrics.update(monitor.end_step(step, metrics, _stat_sums(0.5 if step <= 4 else 2.0)))
        history.append({"step": step, **metrics})
    return history


def test_monitor_metrics_alarms_and_replay_on_resume(tmp_path):
    live = _monitor(tmp_path)
    history = _live_run(live)
    assert history[0]["monitor/brightness"] == 0.5 and "monitor/z/brightness" not in history[0]
    # step 5: trailing mean (0.5 + 0.5 + 2.0) / 3 = 1.0; baseline median 0.5, MAD 0 -> scale 2% x 0.5 = 0.01
    assert history[4]["monitor/z/brightness"] == pytest.approx((1.0 - 0.5) / 0.01)
    kinds = [(a.kind, a.signal, a.step) for a in live.alarms]
    # eval 0.7 -> 0.6 over steps 2-4 while the reward rose: divergence at step 4 (window 2); every statistic
    # moved 0.5 -> 2.0 at step 5: z beyond 6 from step 5, patience 2 -> drift at step 6
    assert kinds[0] == ("divergence", "eval/x", 4)
    assert {k for k in kinds[1:]} == {("drift", name, 6) for name in STATS}
    assert history[-1]["monitor/alarms"] == float(len(STATS) + 1)
    resumed = _monitor(tmp_path)
    resumed.replay(history, saved_steps=[], checkpoint_dir=tmp_path)
    assert [a.as_dict() for a in resumed.alarms] == [a.as_dict() for a in live.alarms]
    assert len(resumed.take_unreported()) == len(STATS) + 1  # reported again once after the resume
    assert resumed.drift.baseline == live.drift.baseline


def test_statistics_run_on_the_background_thread_and_a_failure_skips_the_step(tmp_path, caplog):
    import threading

    monitor = _monitor(tmp_path)
    threads = []
    real = monitor._executor.submit
    monitor._executor.submit = lambda fn, *a: real(lambda *b: threads.append(threading.current_thread()) or fn(*b), *a)
    monitor.submit(np.zeros((2, 16, 16, 3), np.uint8), [0, 0])
    sums = monitor.step_sums()
    assert threads and threads[0] is not threading.main_thread()
    assert sums["brightness"] == (0.0, 2) and sums["diversity"] == (0.0, 1)
    monitor.submit(np.zeros((2, 16, 16), np.uint8), [0, 0])  # not RGB: the thread raises
    with caplog.at_level("WARNING"):
        assert monitor.step_sums() == {name: (0.0, 0) for name in STATS}
    assert "the image statistics of this step failed" in caplog.text
    metrics = monitor.end_step(1, {}, monitor.step_sums())  # nothing submitted: NaN means (the alarms skip NaN)
    assert math.isnan(metrics["monitor/brightness"])
    monitor.close()


def test_monitor_metrics_are_means_over_every_ranks_images(tmp_path, monkeypatch):
    """The trainer adds every rank's (sum, count) pairs up before the means: here rank 0 has 2 black images in one
    group and a stand-in second rank 6 white ones in three groups (sums added in the all-reduce)."""
    import torch

    from deepgen_rl.trainer import hacking

    other = {name: (0.0, 0) for name in STATS}
    other.update(brightness=(6.0, 6), diversity=(0.0, 3))  # white: luma 1; identical images: distance 0
    flat_other = torch.tensor([v for name in STATS for v in other[name]], dtype=torch.float64)
    monkeypatch.setattr(hacking, "all_reduce_sum", lambda tensor, device: tensor + flat_other)
    trainer = SimpleNamespace(monitor=_monitor(tmp_path), device="cpu", rank=0)
    batch = SimpleNamespace(images=torch.zeros(2, 3, 16, 16), trajectory=SimpleNamespace(group_ids=[0, 0]))
    hacking.submit_images(trainer.monitor, batch)
    metrics = hacking.monitor_metrics(trainer, 1, {"reward/mean": 0.5})
    assert metrics["monitor/brightness"] == pytest.approx(6.0 / 8)  # (0 + 0 + 6 x 1) / 8 images
    assert metrics["monitor/diversity"] == 0.0  # 4 groups, each of identical images
    assert metrics["monitor/saturation"] == 0.0  # 2 black images (rank 0 only: the other sent (0, 0))
    assert metrics["monitor/alarms"] == 0.0


def test_best_checkpoint_follows_the_held_out_score_and_survives_rotation_and_resume(tmp_path):
    from deepgen_rl.trainer.checkpointing import rotate_checkpoints

    monitor = _monitor(tmp_path)
    history = _live_run(monitor)
    for step in (2, 4, 6):  # checkpoints at the eval steps: 0.7, 0.6, 0.3 -> the first stays best
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "latest").write_text("global_step")
        monitor.on_save(step, folder)
    assert read_best(tmp_path) == {"checkpoint": str(tmp_path / "checkpoint-2"), "step": 2, "metric": "eval/x",
                                   "score": 0.7}
    removed = rotate_checkpoints(tmp_path, limit=1, keep=tmp_path / "checkpoint-6")
    assert removed == [tmp_path / "checkpoint-4"]
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    # resume: the best among the checkpoints still there, rewritten if the record was lost
    (tmp_path / BEST_CHECKPOINT_NAME).unlink()
    resumed = _monitor(tmp_path)
    resumed.replay(history, saved_steps=[2, 6], checkpoint_dir=tmp_path)
    assert read_best(tmp_path)["checkpoint"] == str(tmp_path / "checkpoint-2")
    assert best_saved([(2, 0.7), (4, 0.9), (6, 0.3)], [2, 6]) == (2, 0.7)
    assert best_saved([(2, 0.7)], []) is None


def test_monitor_png_is_written(tmp_path):
    monitor = _monitor(tmp_path)
    _live_run(monitor)
    path = monitor.plot()
    assert path == tmp_path / "monitor.png" and path.stat().st_size > 1000
    from PIL import Image

    assert Image.open(path).format == "PNG"
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    broken = _monitor(tmp_path / "blocker" / "run")
    assert broken.plot() is None  # logged, not raised


def _fake_trainer(tmp_path, on_reward_hacking: str, save_strategy: str = "steps"):
    from deepgen_rl.trainer.failure_budget import RunSummary

    monitor = _monitor(tmp_path, on_reward_hacking=on_reward_hacking)
    _live_run(monitor)
    saved = []
    args = SimpleNamespace(output_dir=str(tmp_path), on_reward_hacking=on_reward_hacking, save_strategy=save_strategy)
    trainer = SimpleNamespace(args=args, monitor=monitor, rank=0, summary=RunSummary(), device="cpu",
                              state=SimpleNamespace(global_step=8),
                              save=lambda: saved.append(8) or tmp_path / "checkpoint-8")
    return trainer, saved


def test_warn_logs_every_alarm_into_the_run_summary(tmp_path, caplog):
    from deepgen_rl.trainer.hacking import act_on_alarms

    trainer, saved = _fake_trainer(tmp_path, "warn")
    with caplog.at_level("WARNING"):
        act_on_alarms(trainer)
    assert saved == [] and "REWARD HACKING SUSPECTED" in caplog.text and "eval/x" in caplog.text
    trainer.summary.write(str(tmp_path))
    record = json.loads((tmp_path / "run_summary.json").read_text())
    assert [a["kind"] for a in record["reward_hacking_alarms"]] == ["divergence"] + ["drift"] * len(STATS)
    assert record["stopped_because"] == ""
    act_on_alarms(trainer)  # nothing new: nothing added
    assert len(trainer.summary.reward_hacking_alarms) == len(STATS) + 1


def test_stop_checkpoints_and_names_the_alarm_and_the_best_checkpoint(tmp_path):
    from deepgen_rl.trainer.hacking import RewardHackingStopped, act_on_alarms

    trainer, saved = _fake_trainer(tmp_path, "stop")
    trainer.monitor.best = {"checkpoint": str(tmp_path / "checkpoint-2"), "step": 2, "metric": "eval/x", "score": 0.7}
    with pytest.raises(RewardHackingStopped) as caught:
        act_on_alarms(trainer)
    message = str(caught.value)
    assert saved == [8]
    assert "held-out 'eval/x' fell" in message and f"{tmp_path / 'checkpoint-8'} holds step 8" in message
    assert f"best held-out checkpoint is {tmp_path / 'checkpoint-2'}" in message
    assert trainer.summary.stopped_because == message
    act_on_alarms(trainer)  # the next step: nothing new, no stop (and no second save)
    assert saved == [8]
    nosave, saved = _fake_trainer(tmp_path, "stop", save_strategy="no")
    with pytest.raises(RewardHackingStopped, match="No best checkpoint is recorded"):
        act_on_alarms(nosave)
    assert saved == []


def test_exit_status_of_a_reward_hacking_stop_is_its_own():
    from deepgen_rl import grpo_deepgen

    codes = {grpo_deepgen.EXIT_REWARD_FAILURE, grpo_deepgen.EXIT_DIVERGED, grpo_deepgen.EXIT_USAGE, 0, 1}
    assert grpo_deepgen.EXIT_REWARD_HACKING == 5 and grpo_deepgen.EXIT_REWARD_HACKING not in codes


@pytest.mark.parametrize("flags, message", [
    (["--on_reward_hacking", "halt"], "--on_reward_hacking must be one of warn, stop"),
    (["--monitor_baseline_steps", "0"], "--monitor_baseline_steps must be a positive integer"),
    (["--monitor_patience", "0"], "--monitor_patience must be a positive integer"),
    (["--monitor_z", "-1"], "--monitor_z must be >= 0"),
    (["--monitor_eval_window", "1"], "--monitor_eval_window must be 0 .off. or >= 2"),
])
def test_bad_monitor_flags_are_refused_by_name(tmp_path, flags, message):
    from deepgen_rl.config import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(["--output_dir", str(tmp_path), *flags])


def test_monitor_flag_defaults(tmp_path):
    from deepgen_rl.config import parse_args

    args, *_ = parse_args(["--output_dir", str(tmp_path)])
    assert MonitorSettings.from_args(args) == MonitorSettings(10, 5.0, 3, 3, "overall", "warn")

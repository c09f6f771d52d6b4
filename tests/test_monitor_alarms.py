"""The reward-hacking alarms on synthetic series (no model): the drift alarm's two-sample statistic, its baseline
from the first step, patience and direction; the divergence alarm's trends against the evaluations' standard
errors; best_checkpoint.json through saves, rotation and resume; warn / stop; the flags. Expected values are
worked out in each test (by hand, or recomputed in float64 from the raw group values)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deepgen_rl.monitor import MonitorSettings, RewardHackingMonitor, held_out_score
from deepgen_rl.monitor.alarms import (DivergenceAlarm, DriftAlarm, mean_sd, normal_equivalent, slope, slope_t,
                                       slope_z_known_errors, two_sample_z)
from deepgen_rl.monitor.best import BEST_CHECKPOINT_NAME, best_saved, read_best
from deepgen_rl.monitor.monitor import held_out_score_se
from deepgen_rl.monitor.stats import STATS


def _moments(values) -> tuple[float, float, int]:
    values = np.asarray(values, np.float64)
    return float(values.sum()), float((values ** 2).sum()), int(values.size)


def _t_test(base, trail) -> tuple[float, int]:
    """Student's pooled two-sample t and its degrees of freedom, from the raw values (numpy, ddof 1)."""
    base, trail = np.asarray(base, np.float64), np.asarray(trail, np.float64)
    dof = base.size + trail.size - 2
    pooled = ((base.size - 1) * base.var(ddof=1) + (trail.size - 1) * trail.var(ddof=1)) / dof
    return (trail.mean() - base.mean()) / math.sqrt(pooled * (1 / base.size + 1 / trail.size)), dof


def test_mean_sd_from_moments():
    # 1, 2, 3, 4: sum 10, squares 30 -> mean 2.5, variance (30 - 4 x 6.25) / 3 = 5 / 3
    assert mean_sd((10.0, 30.0, 4)) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_sd((2.0, 4.0, 1))[0] == 2.0 and math.isnan(mean_sd((2.0, 4.0, 1))[1])
    assert all(math.isnan(v) for v in mean_sd((0.0, 0.0, 0)))


def test_normal_equivalent_of_t_matches_the_tables():
    # two-sided t-table quantiles and the normal deviates of the same tail probability
    assert normal_equivalent(2.228, 10) == pytest.approx(1.960, abs=0.005)  # 97.5%
    assert normal_equivalent(2.750, 30) == pytest.approx(2.576, abs=0.005)  # 99.5%
    assert normal_equivalent(6.869, 5) == pytest.approx(3.291, abs=0.03)  # 99.95%, and never above it:
    assert normal_equivalent(6.869, 5) < 3.291  # the approximation errs conservative
    assert normal_equivalent(-3.0, 1e7) == pytest.approx(-3.0, abs=1e-4)  # many degrees of freedom: t is normal


def test_two_sample_z_is_the_pooled_t_test_on_the_normal_scale():
    base, trail = [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0]
    # by hand: m0 2.5, s0^2 5/3; m 6, s^2 1; sp^2 = (3 x 5/3 + 2 x 1) / 5 = 1.4;
    # t = 3.5 / sqrt(1.4 x (1/4 + 1/3)) = 3.873 on 5 degrees of freedom
    t, dof = _t_test(base, trail)
    assert t == pytest.approx(3.5 / math.sqrt(1.4 * (1 / 4 + 1 / 3))) and dof == 5
    z, effect = two_sample_z(_moments(base), _moments(trail))
    assert z == pytest.approx(normal_equivalent(t, 5)) and 2.4 < z < 2.6  # tail p 0.012 two-sided: z 2.52
    assert effect == pytest.approx(3.5 / math.sqrt(5 / 3))
    # one trailing group: its spread is unknown, the baseline's alone is used: sp^2 = 3 x 5/3 / 3
    z1, _ = two_sample_z(_moments(base), _moments([5.0]))
    assert z1 == pytest.approx(normal_equivalent(2.5 / math.sqrt(5 / 3 * (1 / 4 + 1)), 3))
    assert math.isnan(two_sample_z(_moments([1.0]), _moments(trail))[0])  # a baseline of one group: no scale
    # identical baseline groups: s0 floored at 2% of |m0| = 0.02 (no division by zero)
    z2, effect2 = two_sample_z(_moments([1.0] * 4), _moments([1.1] * 4))
    assert effect2 == pytest.approx(0.1 / 0.02)
    assert z2 == pytest.approx(normal_equivalent(0.1 / math.sqrt(3 * 0.02 ** 2 / 6 * (1 / 4 + 1 / 4)), 6))


def test_slopes_and_their_significance():
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert slope([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)  # sum(xc * yc) / sum(xc^2) = 1 / 5
    assert math.isnan(slope([1], [1]))
    # residuals of 0, 1, 0, 1 about 0.5 + 0.2 xc: -0.2, 0.6, -0.6, 0.2 -> RSS 0.8, variance 0.4, Sxx 5
    assert slope_t([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2 / math.sqrt(0.4 / 5))
    assert slope_t([0, 1, 2], [1, 2, 3]) == math.inf and math.isnan(slope_t([0, 1], [0, 1]))
    # evaluations at steps 0, 4, 8: xc -4, 0, 4, Sxx 32, c = -1/8, 0, 1/8; b = (-4 x 0.36 + 4 x 0.04) / 32 = -0.04
    # var(b) = (0.05^2 + 0.02^2) / 64
    assert slope_z_known_errors([0, 4, 8], [0.36, 0.15, 0.04], [0.05, 0.05, 0.02]) == pytest.approx(
        -0.04 / math.sqrt((0.05 ** 2 + 0.02 ** 2) / 64))


def _drift(steps: list[list[float]], baseline=1, z=5.0, patience=2):
    """Each step: its group values of 'brightness'."""
    alarm = DriftAlarm(baseline, z, patience)
    fired = []
    for step, values in enumerate(steps, start=1):
        _, new = alarm.update(step, {"brightness": _moments(values)})
        fired += new
    return alarm, fired


def test_drift_baseline_is_the_first_steps_groups_and_the_window_trails():
    first = [0.9, 1.0, 1.1, 1.0]
    alarm, fired = _drift([first, [1.0] * 4, [2.0] * 4, [2.0] * 4, [2.0] * 4, [2.0] * 4])
    assert alarm.baseline == {"brightness": _moments(first)}  # the first step only (baseline_steps 1)
    expected = {}
    windows = {2: [1.0] * 4, 3: [1.0] * 4 + [2.0] * 4, 4: [1.0] * 4 + [2.0] * 8, 5: [2.0] * 12, 6: [2.0] * 12}
    for step, window in windows.items():  # the last 3 steps after the baseline
        t, dof = _t_test(first, window)
        expected[step] = normal_equivalent(t, dof)
    assert [s for s, _ in alarm.z_history] == [2, 3, 4, 5, 6]
    for step, zs in alarm.z_history:
        assert zs["brightness"] == pytest.approx(expected[step], abs=1e-9), step
    # z: 0, 1.8, 2.5 (inside 5), then 45: the streak begins at step 5, patience 2 fires at step 6
    assert expected[4] < 5 < expected[5]
    assert [(a.kind, a.signal, a.direction, a.began_step, a.step) for a in fired] == [
        ("drift", "brightness", "up", 5, 6)]
    # a fall to 0.2: at step 2 the window has 4 groups, t = -0.8 / sqrt(0.02 / 6 x (1/4 + 1/4)) = -19.6 on 6
    # degrees of freedom: z -4.8 (few groups cannot be that sure); step 3 (8 groups, 10 dof) is beyond 5
    _, down = _drift([first] + [[0.2] * 4] * 3)
    assert normal_equivalent(-0.8 / math.sqrt(0.02 / 6 * 0.5), 6) > -5
    assert [(a.direction, a.began_step, a.step) for a in down] == [("down", 3, 4)]
    # two baseline steps: both steps' groups (8) form it
    two, _ = _drift([first, [1.2] * 4, [1.0] * 4], baseline=2)
    assert two.baseline["brightness"] == pytest.approx(_moments(first + [1.2] * 4))


def test_drift_alarm_catches_a_hack_learned_within_a_few_steps():
    # the statistic ramps up from the second step on and settles: a 10-step baseline would have learned the ramp
    rng = np.random.default_rng(1)
    ramp = [1.0, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    steps = [list(level + 0.1 * rng.standard_normal(8)) for level in ramp]
    _, fired = _drift(steps)
    # z 1.8, 2.5, 4.3 on the way up (the window trails), 5.6 at step 6, 7.0 at step 7: fires at step 7
    assert [(a.direction, a.began_step, a.step) for a in fired] == [("up", 6, 7)]
    assert _drift(steps, baseline=10)[1] == []  # a baseline over the first 10 steps has the ramp in it


def test_drift_alarm_needs_consecutive_steps_a_real_effect_and_can_be_off():
    first = [0.9, 1.0, 1.1, 1.0]
    # a spike of one step lifts the trailing window for 3 steps (patience 4): a streak of 3, then back -> no alarm
    spike = [first, [1.0] * 4, [1.0] * 4, [3.0] * 4] + [[1.0] * 4] * 6
    assert _drift(spike, patience=4)[1] == []
    assert _drift([first] + [[3.0] * 4] * 8, z=0.0)[1] == []
    # 400 groups per step at +-1 (s0 ~ 1): a shift of 0.3 is significant (t ~ 5.2 > 5 on ~1600 degrees of
    # freedom) but a third of a standard deviation, under MIN_EFFECT 0.5: no alarm; a shift of 0.6 fires
    base = [1.0, -1.0] * 200
    t, _ = _t_test(base, [v + 0.3 for v in base] * 3)
    assert t > 5.0
    assert _drift([base] + [[v + 0.3 for v in base]] * 6)[1] == []
    assert len(_drift([base] + [[v + 0.6 for v in base]] * 6)[1]) == 1


def test_drift_alarm_stays_silent_on_stationary_noise():
    # 8 groups a step from one distribution for 300 steps: the t-test's tail (z 5: 6e-7 a step) keeps it silent
    rng = np.random.default_rng(0)
    steps = [list(0.8 + 0.01 * rng.standard_normal(8)) for _ in range(300)]
    alarm, fired = _drift(steps, patience=3)
    assert fired == []
    assert max(abs(zs["brightness"]) for _, zs in alarm.z_history) < 5


def test_divergence_alarm_needs_reward_up_and_held_out_down_beyond_their_noise():
    def run(reward_slope: float, evals: list[float], window: int = 3, se=0.01, wiggle=0.0):
        alarm = DivergenceAlarm(window, "eval/x")
        fired = []
        for step in range(1, 31):
            alarm.reward(step, 0.5 + reward_slope * step + wiggle * (-1) ** step)
            if step % 10 == 0:
                out = alarm.evaluation(step, evals[step // 10 - 1], se)
                fired += [out] if out else []
        return fired

    # fall 0.1 per evaluation, se 0.01 each: xc -10, 0, 10, b = -0.01, se(b) = 0.01 x sqrt(2 x 0.05^2) = 7.1e-4:
    # a fall of 14 standard errors
    fired = run(0.01, [0.6, 0.5, 0.4])
    assert [(a.kind, a.signal, a.began_step, a.step) for a in fired] == [("divergence", "eval/x", 10, 30)]
    assert "slope -0.01/step" in fired[0].detail and "14.1 standard errors" in fired[0].detail
    assert run(0.01, [0.4, 0.5, 0.6]) == []  # both up: learning
    assert run(-0.01, [0.6, 0.5, 0.4]) == []  # both down: failing, not hacking
    assert run(0.01, [0.6, 0.5, 0.4], window=0) == []
    assert run(0.01, [0.6, 0.5, 0.4], window=4) == []  # three evaluations only
    # the same fall with se 0.05: 0.01 / (0.05 x sqrt(0.005)) = 2.8 standard errors < 3: evaluation noise
    assert run(0.01, [0.6, 0.5, 0.4], se=0.05) == []
    assert len(run(0.01, [0.6, 0.5, 0.4], se=0.04)) == 1  # 3.5 standard errors
    # the reward's rise lost in its own noise: slope 0.001/step against a +-0.05 zig-zag: t ~ 0.3 < 2
    assert run(0.001, [0.6, 0.5, 0.4], wiggle=0.05) == []
    # no standard error reported: the fitted drop must exceed 2% of the window's mean
    assert run(0.01, [0.5, 0.4975, 0.495], se=None) == []  # drop 0.005 < 0.00995
    assert len(run(0.01, [0.5, 0.495, 0.485], se=None)) == 1  # drop 0.015 > 0.00987


def test_held_out_score_overall_and_named():
    metrics = {"eval/a/overall": 0.4, "eval/b/overall": 0.6, "eval/a/Attribute": 0.9, "reward/mean": 3.0}
    assert held_out_score(metrics, "overall") == pytest.approx(0.5)
    assert held_out_score(metrics, "eval/a/Attribute") == 0.9
    assert held_out_score(metrics, "a/Attribute") == 0.9
    assert held_out_score({"reward/mean": 1.0}, "overall") is None
    # standard errors: overall's is sqrt(0.03^2 + 0.04^2) / 2 = 0.025; None unless every dataset has one
    with_se = {**metrics, "eval/a/overall_se": 0.03, "eval/b/overall_se": 0.04, "eval/a/Attribute_se": 0.1}
    assert held_out_score_se(with_se, "overall") == (pytest.approx(0.5), pytest.approx(0.025))
    assert held_out_score_se({**metrics, "eval/a/overall_se": 0.03}, "overall") == (pytest.approx(0.5), None)
    assert held_out_score_se(with_se, "a/Attribute") == (0.9, 0.1)


def _stat_sums(value: float) -> dict:
    """Every statistic at ``value`` in each of 4 groups."""
    return {name: _moments([value] * 4) for name in STATS}


def _monitor(tmp_path: Path, **settings) -> RewardHackingMonitor:
    return RewardHackingMonitor(MonitorSettings(**{"baseline_steps": 1, "z": 6.0, "patience": 2, "eval_window": 2,
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
    assert history[0]["monitor/sd/brightness"] == 0.0 and history[0]["monitor/n/brightness"] == 4.0
    # baseline: step 1's 4 groups at 0.5 (s0 0 -> floor 0.01); step 5's window (steps 3-5): 8 groups at 0.5 and 4
    # at 2.0 -> t 1.3; step 7's (5-7): 12 groups at 2.0 -> t 561 > 6: the streak begins at 7, patience 2 -> step 8
    t5 = 0.5 / math.sqrt((3 * 0.01 ** 2 + 11 * 6 / 11) / 14 * (1 / 4 + 1 / 12))
    assert history[4]["monitor/z/brightness"] == pytest.approx(normal_equivalent(t5, 14))
    kinds = [(a.kind, a.signal, a.step) for a in live.alarms]
    # eval 0.7 -> 0.6 over steps 2-4 (no standard error: the 2% rule) while the reward rose along a line: divergence
    # at step 4 (window 2); every statistic: drift at step 8
    assert kinds[0] == ("divergence", "eval/x", 4)
    assert {k for k in kinds[1:]} == {("drift", name, 8) for name in STATS}
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
    assert sums["brightness"] == (0.0, 0.0, 1) and sums["diversity"] == (0.0, 0.0, 1)  # one group
    monitor.submit(np.zeros((2, 16, 16), np.uint8), [0, 0])  # not RGB: the thread raises
    with caplog.at_level("WARNING"):
        assert monitor.step_sums() == {name: (0.0, 0.0, 0) for name in STATS}
    assert "the image statistics of this step failed" in caplog.text
    metrics = monitor.end_step(1, {}, monitor.step_sums())  # nothing submitted: NaN means (the alarms skip NaN)
    assert math.isnan(metrics["monitor/brightness"])
    monitor.close()


def test_monitor_metrics_are_means_over_every_ranks_images(tmp_path, monkeypatch):
    """The trainer adds every rank's moments of the group values up before the means: here rank 0 has 2 black
    images in one group and a stand-in second rank 6 white ones in three groups (moments added in the
    all-reduce)."""
    import torch

    from deepgen_rl.trainer import hacking

    other = {name: (0.0, 0.0, 0) for name in STATS}
    other.update(brightness=(3.0, 3.0, 3), diversity=(0.0, 0.0, 3))  # white groups: luma 1; identical: distance 0
    flat_other = torch.tensor([v for name in STATS for v in other[name]], dtype=torch.float64)
    monkeypatch.setattr(hacking, "all_reduce_sum", lambda tensor, device: tensor + flat_other)
    trainer = SimpleNamespace(monitor=_monitor(tmp_path), device="cpu", rank=0)
    batch = SimpleNamespace(images=torch.zeros(2, 3, 16, 16), trajectory=SimpleNamespace(group_ids=[0, 0]))
    hacking.submit_images(trainer.monitor, batch)
    metrics = hacking.monitor_metrics(trainer, 1, {"reward/mean": 0.5})
    assert metrics["monitor/brightness"] == pytest.approx(3.0 / 4)  # (0 + 3 x 1) / 4 groups
    assert metrics["monitor/n/brightness"] == 4.0
    assert metrics["monitor/sd/brightness"] == pytest.approx(math.sqrt((3 - 4 * 0.75 ** 2) / 3))  # 0, 1, 1, 1
    assert metrics["monitor/diversity"] == 0.0  # 4 groups, each of identical images
    assert metrics["monitor/saturation"] == 0.0  # 2 black images (rank 0 only: the other sent (0, 0, 0))
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
    assert MonitorSettings.from_args(args) == MonitorSettings(1, 5.0, 3, 3, "overall", "warn")

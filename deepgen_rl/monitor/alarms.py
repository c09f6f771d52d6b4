"""The two reward-hacking alarms, as pure state machines over per-step values (no trainer, no I/O).

Drift (``DriftAlarm``): the first ``baseline_steps`` step means of each image statistic are its baseline; after
it, each step's trailing mean (the last ``TRAILING_STEPS`` step means) is scored as a robust z-score

    z = (trailing mean - median(baseline)) / scale,
    scale = max(1.4826 x MAD(baseline), REL_SCALE_FLOOR x |median(baseline)|, ABS_SCALE_FLOOR)

(1.4826 x MAD estimates a standard deviation for normal data, unmoved by an outlier step; the floors keep a
baseline that barely varies - many images per step average the noise out - from turning a few-percent move into
a huge z). The alarm fires when |z| > ``z_threshold`` for ``patience`` consecutive steps, naming the statistic,
its direction and the step its streak began.

Divergence (``DivergenceAlarm``): over the last ``window`` held-out evaluations, the held-out score falls - its
least-squares line drops by more than MIN_HELDOUT_DROP of the window's mean |score| from the first evaluation to
the last (evaluation noise moves it a little either way) - while the slope of the training reward (every step from
the first of those evaluations to the last) is positive: the policy earns more of the reward it is trained on and
does worse on what the reward was meant to measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

TRAILING_STEPS = 3
MAD_TO_STD = 1.4826
REL_SCALE_FLOOR = 0.02
ABS_SCALE_FLOOR = 1e-6
MIN_HELDOUT_DROP = 0.02


@dataclass(frozen=True)
class Alarm:
    """One alarm: ``kind`` "drift" or "divergence"; ``signal`` the statistic (drift) or the held-out metric;
    ``direction`` "up" / "down"; ``began_step``: the first step of the streak (drift) or the first evaluation of
    the window (divergence); ``step``: when it fired; ``detail``: the numbers behind it."""

    kind: str
    signal: str
    direction: str
    began_step: int
    step: int
    detail: str

    def describe(self) -> str:
        if self.kind == "drift":
            return (f"image statistic '{self.signal}' drifted {self.direction} from its baseline since step "
                    f"{self.began_step} (alarm at step {self.step}: {self.detail})")
        return (f"held-out '{self.signal}' fell while the training reward rose over the evaluations since step "
                f"{self.began_step} (alarm at step {self.step}: {self.detail})")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "signal": self.signal, "direction": self.direction,
                "began_step": self.began_step, "step": self.step, "message": self.describe()}


def robust_location_scale(values: Sequence[float]) -> tuple[float, float]:
    """(median, scale) of baseline values (module docstring's floors applied); NaNs ignored."""
    data = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    median = float(np.median(data))
    mad = float(np.median(np.abs(data - median)))
    return median, max(MAD_TO_STD * mad, REL_SCALE_FLOOR * abs(median), ABS_SCALE_FLOOR)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs (NaN for fewer than two distinct xs)."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


class DriftAlarm:
    """Feed ``update(step, {stat: step mean})`` once per step; returns the alarms that fire at this step (each
    statistic fires once per run). ``z_threshold`` 0 disables it (z-scores are still computed)."""

    def __init__(self, baseline_steps: int, z_threshold: float, patience: int) -> None:
        self.baseline_steps, self.z_threshold, self.patience = baseline_steps, z_threshold, patience
        self.history: dict[str, list[float]] = {}
        self.baseline: dict[str, tuple[float, float]] = {}
        self.streak_start: dict[str, Optional[int]] = {}
        self.streak_len: dict[str, int] = {}
        self.fired: dict[str, Alarm] = {}
        self.steps_seen = 0
        self.z_history: list[tuple[int, dict[str, float]]] = []

    def update(self, step: int, values: Mapping[str, float]) -> tuple[dict[str, float], list[Alarm]]:
        """(z-score of each statistic at this step - {} during the baseline, NaN where undefined; new alarms)."""
        self.steps_seen += 1
        for name, value in values.items():
            self.history.setdefault(name, []).append(float(value))
        if self.steps_seen <= self.baseline_steps:
            if self.steps_seen == self.baseline_steps:
                self.baseline = {name: robust_location_scale(series) for name, series in self.history.items()}
            return {}, []
        zs, alarms = {}, []
        for name, series in self.history.items():
            if name not in self.baseline:
                continue
            trailing = [v for v in series[-TRAILING_STEPS:] if math.isfinite(v)]
            median, scale = self.baseline[name]
            z = (float(np.mean(trailing)) - median) / scale if trailing and math.isfinite(median) else float("nan")
            zs[name] = z
            outside = math.isfinite(z) and self.z_threshold > 0 and abs(z) > self.z_threshold
            if not outside:
                self.streak_start[name], self.streak_len[name] = None, 0
                continue
            if self.streak_start.get(name) is None:
                self.streak_start[name], self.streak_len[name] = step, 0
            self.streak_len[name] += 1
            if self.streak_len[name] >= self.patience and name not in self.fired:
                alarm = Alarm("drift", name, "up" if z > 0 else "down", self.streak_start[name], step,
                              f"z {z:+.1f} beyond +-{self.z_threshold:g} for {self.streak_len[name]} steps; "
                              f"baseline median {median:.4g}, now {np.mean(trailing):.4g}")
                self.fired[name] = alarm
                alarms.append(alarm)
        self.z_history.append((step, zs))
        return zs, alarms


class DivergenceAlarm:
    """Feed ``reward(step, value)`` every step and ``evaluation(step, score)`` at each held-out evaluation; the
    latter returns the alarm when it fires (once per run). ``window`` 0 disables it."""

    def __init__(self, window: int, metric: str) -> None:
        self.window, self.metric = window, metric
        self.rewards: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.fired: Optional[Alarm] = None

    def reward(self, step: int, value: float) -> None:
        if math.isfinite(value):
            self.rewards.append((step, float(value)))

    def evaluation(self, step: int, score: float) -> Optional[Alarm]:
        if not math.isfinite(score):
            return None
        self.evals.append((step, float(score)))
        if self.window < 2 or len(self.evals) < self.window or self.fired is not None:
            return None
        recent = self.evals[-self.window:]
        first, last = recent[0][0], recent[-1][0]
        rewards = [(s, v) for s, v in self.rewards if first <= s <= last]
        eval_slope = slope([s for s, _ in recent], [v for _, v in recent])
        reward_slope = slope([s for s, _ in rewards], [v for _, v in rewards])
        scores = [v for _, v in recent]
        drop = -eval_slope * (last - first)
        if drop > MIN_HELDOUT_DROP * float(np.mean(np.abs(scores))) and reward_slope > 0:
            self.fired = Alarm("divergence", self.metric, "down", first, step,
                               f"held-out {recent[0][1]:.4g} -> {recent[-1][1]:.4g} (slope {eval_slope:+.3g}/step) "
                               f"while the training reward's slope was {reward_slope:+.3g}/step over steps "
                               f"{first}-{last}")
            return self.fired
        return None

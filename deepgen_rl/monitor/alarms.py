"""The two reward-hacking alarms, as pure state machines over per-step values (no trainer, no I/O).

Drift (``DriftAlarm``). The unit of measurement is the rollout GROUP: a group's images share their prompt and,
under --init_same_noise, their initial noise, so they are not independent draws; the groups of a step are
(different prompts, fresh noise). Each statistic's value of a group (the mean over its images; diversity has one
value per group) is one observation. Each step hands in, per statistic, the moments (sum, sum of squares, count)
of its group values (moments add up over ranks).

- Baseline: the group values of the first ``baseline_steps`` steps (default 1: only the first step, whose rollout
  the initial policy made before any update, so a hack learned within a few steps cannot hide in its baseline):
  their mean m0 and standard deviation s0 (ddof 1) over G0 groups.
- After it, the trailing window (the last ``TRAILING_STEPS`` steps after the baseline; fewer right after it),
  G groups with mean m, standard deviation s, is compared to the baseline by Student's two-sample t-test:

      t = (m - m0) / (sp sqrt(1/G0 + 1/G)),   sp^2 = ((G0 - 1) s0^2 + (G - 1) s^2) / (G0 + G - 2)

  (under "the images still come from the initial policy" both samples are groups of one distribution; the pooled
  sp uses both samples' spread), reported on the normal scale so that ``z_threshold`` means the same for any
  number of groups: z = normal_equivalent(t, G0 + G - 2) (Wallace's approximation below). The mean is compared
  with a mean, not with a median: a median of skewed statistics (high_frequency, jpeg_bpp) is not what a step's
  mean estimates, and that gap, divided by a standard error that shrinks with the batch, would alarm on its own.
- The alarm needs both |z| > ``z_threshold`` (the move is real, not sampling noise) and |m - m0| > MIN_EFFECT x s0
  (the move is large next to the spread of the initial policy's groups: with hundreds of groups per step a
  harmless shift is "significant"). |z| beyond the threshold for ``patience`` consecutive steps fires it, naming
  the statistic, its direction and the step the streak began. s0 has floors (REL_SCALE_FLOOR x |m0|,
  ABS_SCALE_FLOOR) so a baseline of identical images cannot divide by zero.

Divergence (``DivergenceAlarm``): over the last ``window`` held-out evaluations, the held-out score falls beyond
its own noise while the training reward rises beyond its own noise:

- held-out: the least-squares slope b of score on step, with its standard error from the evaluations' own
  standard errors se_i (independent evaluations: var(b) = sum_i c_i^2 se_i^2, c_i = (x_i - mean x) / Sxx); the fall
  must satisfy -b / se(b) > HELDOUT_Z. An evaluation without a standard error (a metric that reports none) falls
  back to a fitted drop larger than MIN_HELDOUT_DROP of the window's mean |score|.
- training reward: the least-squares slope of every step's reward/mean from the first of those evaluations to the
  last, with its t statistic from the residuals (n - 2 degrees of freedom), must exceed REWARD_T.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

TRAILING_STEPS = 3
REL_SCALE_FLOOR = 0.02
ABS_SCALE_FLOOR = 1e-6
MIN_EFFECT = 0.5  # drift: the trailing mean must also move by half a baseline group standard deviation
HELDOUT_Z = 3.0  # divergence: the held-out fall in standard errors (one-sided 0.13% by chance per window)
REWARD_T = 2.0  # divergence: the training reward's rise, t statistic of its slope
MIN_HELDOUT_DROP = 0.02  # divergence without evaluation standard errors: the relative fall

Moments = tuple[float, float, int]  # (sum, sum of squares, count) of a statistic's group values


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


def add_moments(a: Moments, b: Moments) -> Moments:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def mean_sd(moments: Moments) -> tuple[float, float]:
    """(mean, sample standard deviation (ddof 1)) from (sum, sum of squares, count); NaN where undefined."""
    total, squares, count = moments
    if count < 1:
        return float("nan"), float("nan")
    mean = total / count
    if count < 2:
        return mean, float("nan")
    return mean, math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1))


def normal_equivalent(t: float, dof: float) -> float:
    """The normal deviate with the tail probability of Student's t with ``dof`` degrees of freedom (Wallace 1959:
    z = (8 dof + 1) / (8 dof + 3) sqrt(dof ln(1 + t^2 / dof)); no scipy here). It errs low, i.e. conservative:
    t 2.228 at 10 dof (exact z 1.960) -> 1.959; t 6.869 at 5 dof (exact 3.291) -> 3.265."""
    if not math.isfinite(t) or dof <= 0:
        return t
    return math.copysign((8 * dof + 1) / (8 * dof + 3) * math.sqrt(dof * math.log1p(t * t / dof)), t)


def two_sample_z(base: Moments, trail: Moments) -> tuple[float, float]:
    """(z, effect) of the trailing group values against the baseline's (module docstring): z the normal
    equivalent of the pooled two-sample t, effect (m - m0) / s0 (s0 floored). NaN when either side lacks groups."""
    (m0, s0), (m, s) = mean_sd(base), mean_sd(trail)
    g0, g = base[2], trail[2]
    if g0 < 2 or g < 1 or not (math.isfinite(m0) and math.isfinite(m)):
        return float("nan"), float("nan")
    s0 = max(s0, REL_SCALE_FLOOR * abs(m0), ABS_SCALE_FLOOR)
    trail_var = s * s if g >= 2 and math.isfinite(s) else 0.0
    pooled = math.sqrt(((g0 - 1) * s0 * s0 + (g - 1) * trail_var) / (g0 + g - 2))
    t = (m - m0) / (pooled * math.sqrt(1.0 / g0 + 1.0 / g))
    return normal_equivalent(t, g0 + g - 2), (m - m0) / s0


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs (NaN for fewer than two distinct xs)."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def slope_t(xs: Sequence[float], ys: Sequence[float]) -> float:
    """t statistic of the least-squares slope of ys on xs: b / sqrt(RSS / (n - 2) / Sxx) (NaN for n < 3; +-inf
    for a perfect line)."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size < 3 or np.ptp(x) == 0:
        return float("nan")
    b = slope(x, y)
    xc = x - x.mean()
    residuals = y - y.mean() - b * xc
    variance = float((residuals ** 2).sum()) / (x.size - 2) / float((xc * xc).sum())
    if variance <= 0:
        return math.copysign(math.inf, b) if b else float("nan")
    return b / math.sqrt(variance)


def slope_z_known_errors(xs: Sequence[float], ys: Sequence[float], errors: Sequence[float]) -> float:
    """b / se(b) for the least-squares slope of ys on xs whose points have independent standard errors
    ``errors``: var(b) = sum_i c_i^2 se_i^2, c_i = (x_i - mean x) / Sxx. NaN when undefined or se(b) is 0."""
    x, y, se = (np.asarray(v, np.float64) for v in (xs, ys, errors))
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    c = xc / (xc * xc).sum()
    se_b = math.sqrt(float((c * c * se * se).sum()))
    return slope(x, y) / se_b if se_b > 0 else float("nan")


class DriftAlarm:
    """Feed ``update(step, {stat: (sum, sum of squares, count) of its group values})`` once per step; returns the
    z-scores and the alarms that fire at this step (each statistic fires once per run). A step without groups
    (count 0) is skipped. ``z_threshold`` 0 disables the alarm (z-scores are still computed)."""

    def __init__(self, baseline_steps: int, z_threshold: float, patience: int) -> None:
        self.baseline_steps, self.z_threshold, self.patience = baseline_steps, z_threshold, patience
        self.baseline: dict[str, Moments] = {}
        self.baseline_seen: dict[str, int] = {}
        self.window: dict[str, deque] = {}
        self.streak_start: dict[str, Optional[int]] = {}
        self.streak_len: dict[str, int] = {}
        self.fired: dict[str, Alarm] = {}
        self.z_history: list[tuple[int, dict[str, float]]] = []

    def update(self, step: int, values: Mapping[str, Moments]) -> tuple[dict[str, float], list[Alarm]]:
        """(z-score of each statistic at this step - absent during its baseline, NaN where undefined; new
        alarms)."""
        zs, alarms = {}, []
        for name, moments in values.items():
            moments = (float(moments[0]), float(moments[1]), int(moments[2]))
            if moments[2] < 1 or not math.isfinite(moments[0]):
                continue
            if self.baseline_seen.get(name, 0) < self.baseline_steps:
                self.baseline[name] = add_moments(self.baseline.get(name, (0.0, 0.0, 0)), moments)
                self.baseline_seen[name] = self.baseline_seen.get(name, 0) + 1
                continue
            window = self.window.setdefault(name, deque(maxlen=TRAILING_STEPS))
            window.append(moments)
            trail = (0.0, 0.0, 0)
            for item in window:
                trail = add_moments(trail, item)
            z, effect = two_sample_z(self.baseline[name], trail)
            zs[name] = z
            outside = (math.isfinite(z) and self.z_threshold > 0 and abs(z) > self.z_threshold
                       and abs(effect) > MIN_EFFECT)
            if not outside:
                self.streak_start[name], self.streak_len[name] = None, 0
                continue
            if self.streak_start.get(name) is None:
                self.streak_start[name], self.streak_len[name] = step, 0
            self.streak_len[name] += 1
            if self.streak_len[name] >= self.patience and name not in self.fired:
                m0, m = mean_sd(self.baseline[name])[0], mean_sd(trail)[0]
                alarm = Alarm("drift", name, "up" if z > 0 else "down", self.streak_start[name], step,
                              f"z {z:+.1f} beyond +-{self.z_threshold:g} for {self.streak_len[name]} steps; "
                              f"baseline mean {m0:.4g} ({self.baseline[name][2]} groups), trailing mean {m:.4g} "
                              f"({trail[2]} groups), {effect:+.1f} baseline standard deviations")
                self.fired[name] = alarm
                alarms.append(alarm)
        if zs:
            self.z_history.append((step, zs))
        return zs, alarms


class DivergenceAlarm:
    """Feed ``reward(step, value)`` every step and ``evaluation(step, score, se)`` at each held-out evaluation
    (``se``: the score's standard error, None when the evaluation reports none); the latter returns the alarm when
    it fires (once per run). ``window`` 0 disables it."""

    def __init__(self, window: int, metric: str) -> None:
        self.window, self.metric = window, metric
        self.rewards: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float, Optional[float]]] = []
        self.fired: Optional[Alarm] = None

    def reward(self, step: int, value: float) -> None:
        if math.isfinite(value):
            self.rewards.append((step, float(value)))

    def evaluation(self, step: int, score: float, se: Optional[float] = None) -> Optional[Alarm]:
        if not math.isfinite(score):
            return None
        se = float(se) if se is not None and math.isfinite(se) else None
        self.evals.append((step, float(score), se))
        if self.window < 2 or len(self.evals) < self.window or self.fired is not None:
            return None
        recent = self.evals[-self.window:]
        first, last = recent[0][0], recent[-1][0]
        steps, scores = [s for s, _, _ in recent], [v for _, v, _ in recent]
        rewards = [(s, v) for s, v in self.rewards if first <= s <= last]
        eval_slope = slope(steps, scores)
        reward_t = slope_t([s for s, _ in rewards], [v for _, v in rewards])
        if all(e is not None for _, _, e in recent):
            fall_z = -slope_z_known_errors(steps, scores, [e for _, _, e in recent])
            falls, how = fall_z > HELDOUT_Z, f"{fall_z:.1f} standard errors"
        else:
            drop = -eval_slope * (last - first)
            falls = drop > MIN_HELDOUT_DROP * float(np.mean(np.abs(scores)))
            how = f"fitted drop {drop:.3g}, no standard errors reported"
        if falls and reward_t > REWARD_T:
            self.fired = Alarm("divergence", self.metric, "down", first, step,
                               f"held-out {recent[0][1]:.4g} -> {recent[-1][1]:.4g} (slope {eval_slope:+.3g}/step, "
                               f"a fall of {how}) while the training reward rose (slope t {reward_t:+.1f}) over "
                               f"steps {first}-{last}")
            return self.fired
        return None

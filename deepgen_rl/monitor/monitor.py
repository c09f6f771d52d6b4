"""The reward-hacking monitor of a training run: image statistics of every rollout (computed on a background
thread while the step trains), the drift and divergence alarms (alarms.py), best_checkpoint.json (best.py) and
monitor.png (plot.py). The trainer drives it (it knows nothing of the trainer):

    monitor.submit(images, group_ids)          after the rewards: [N, H, W, 3] uint8 images of this rank
    sums = monitor.step_sums()                 waits for the thread: {stat: (sum, sum of squares, count)} of
                                               its group values (the trainer adds the ranks' moments up so
                                               every rank decides alike)
    metrics |= monitor.end_step(step, metrics, sums)   monitor/<stat> (mean), monitor/sd/<stat>, monitor/n/<stat>
                                               (the moments again, for replay), monitor/z/<stat>, the alarms
    monitor.on_save(step, checkpoint)          best_checkpoint.json
    monitor.replay(log_history, saved_steps)   on resume: the same state as the run had (from its logged metrics)
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .alarms import Alarm, DivergenceAlarm, DriftAlarm, mean_sd
from .best import best_saved, read_best, write_best
from .stats import STATS, batch_stats, means

logger = logging.getLogger(__name__)

MONITOR_PNG = "monitor.png"
REWARD_KEY = "reward/mean"
OVERALL = "overall"  # --monitor_eval_metric's default: the mean of every eval/<dataset>/overall
ON_REWARD_HACKING = ("warn", "stop")


@dataclass(frozen=True)
class MonitorSettings:
    """--monitor_baseline_steps, --monitor_z, --monitor_patience, --monitor_eval_window, --monitor_eval_metric,
    --on_reward_hacking (run_flags.py says what each does)."""

    baseline_steps: int = 1
    z: float = 5.0
    patience: int = 3
    eval_window: int = 3
    eval_metric: str = OVERALL
    on_reward_hacking: str = "warn"

    @classmethod
    def from_args(cls, args) -> "MonitorSettings":
        return cls(args.monitor_baseline_steps, args.monitor_z, args.monitor_patience, args.monitor_eval_window,
                   args.monitor_eval_metric, args.on_reward_hacking)


def _finite(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def held_out_score(metrics: Mapping[str, float], metric: str) -> Optional[float]:
    """The held-out score in one step's metrics: ``overall`` -> the mean of the eval/<dataset>/overall values;
    otherwise the metric named (with or without its "eval/" prefix); None when the step has none."""
    found = held_out_score_se(metrics, metric)
    return None if found is None else found[0]


def held_out_score_se(metrics: Mapping[str, float], metric: str) -> Optional[tuple[float, Optional[float]]]:
    """(score, its standard error or None) - held_out_score's score; the standard error is the metric's
    ``<key>_se`` (e.g. eval/unigenbench/overall_se) where the evaluation reports one; for ``overall`` (a mean of
    k datasets' scores, independent samples) sqrt(sum se_d^2) / k, None unless every dataset reports one."""
    if metric == OVERALL:
        keys = [k for k, v in metrics.items()
                if k.startswith("eval/") and k.endswith("/overall") and _finite(v) is not None]
        if not keys:
            return None
        errors = [_finite(metrics.get(f"{k}_se")) for k in keys]
        se = (math.sqrt(sum(e * e for e in errors)) / len(keys)) if all(e is not None for e in errors) else None
        return float(np.mean([float(metrics[k]) for k in keys])), se
    for key in (metric, f"eval/{metric}"):
        value = _finite(metrics.get(key))
        if value is not None:
            return value, _finite(metrics.get(f"{key}_se"))
    return None


class RewardHackingMonitor:
    def __init__(self, settings: MonitorSettings, output_dir: str | Path, is_main: bool) -> None:
        self.settings, self.output_dir, self.is_main = settings, Path(output_dir), is_main
        self.drift = DriftAlarm(settings.baseline_steps, settings.z, settings.patience)
        self.divergence = DivergenceAlarm(settings.eval_window, settings.eval_metric)
        self.alarms: list[Alarm] = []  # every alarm of the run, in order
        self.unreported: list[Alarm] = []  # fired (or replayed on resume) and not yet acted upon
        self.evals: dict[int, float] = {}
        self.best: Optional[dict] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-hacking-monitor")
        self._pending: Optional[Future] = None

    # ----- per step ------------------------------------------------------------------------------------------

    def submit(self, images: np.ndarray, group_ids: Sequence[int]) -> None:
        """Start this step's statistics of ``images`` [N, H, W, 3] uint8 on the background thread."""
        self._pending = self._executor.submit(batch_stats, list(images), [int(g) for g in group_ids])

    def step_sums(self) -> dict[str, tuple[float, int]]:
        """This rank's (sum, count) per statistic of the submitted step ({stat: (0, 0)} when none was)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {name: (0.0, 0.0, 0) for name in STATS}
        try:
            return pending.result()
        except Exception as err:  # the monitor must never end a training run: this step goes unmeasured
            logger.warning("reward-hacking monitor: the image statistics of this step failed (%s: %s); the step "
                           "is left out.", type(err).__name__, err)
            return {name: (0.0, 0.0, 0) for name in STATS}

    def end_step(self, step: int, metrics: Mapping[str, float], sums: Mapping[str, tuple[float, float, int]]
                 ) -> dict[str, float]:
        """The step's monitor metrics from the all-rank moments ``sums``; alarms that fire join ``unreported``.
        monitor/<stat> is the mean of the group values, monitor/sd/<stat> their standard deviation (ddof 1) and
        monitor/n/<stat> their count: the moments a resumed run replays."""
        out = {f"monitor/{name}": value for name, value in means(sums).items()}
        for name, moments in sums.items():
            out[f"monitor/sd/{name}"] = mean_sd(moments)[1]
            out[f"monitor/n/{name}"] = float(moments[2])
        out.update(self._observe(step, sums, metrics))
        out["monitor/alarms"] = float(len(self.alarms))
        return out

    def _observe(self, step: int, values: Mapping[str, tuple[float, float, int]], metrics: Mapping[str, float]
                 ) -> dict[str, float]:
        zs, fired = self.drift.update(step, values) if values else ({}, [])
        reward = metrics.get(REWARD_KEY)
        if isinstance(reward, (int, float)):
            self.divergence.reward(step, float(reward))
        self.observe_eval(step, metrics, fired)
        self._fire(fired)
        return {f"monitor/z/{name}": z for name, z in zs.items()}

    def observe_eval(self, step: int, metrics: Mapping[str, float], fired: Optional[list[Alarm]] = None) -> None:
        """Record the step's held-out score (if it has one) and the divergence alarm it may fire."""
        found = held_out_score_se(metrics, self.settings.eval_metric)
        if found is None:
            return
        score, se = found
        self.evals[step] = score
        alarm = self.divergence.evaluation(step, score, se)
        if alarm is not None:
            if fired is None:
                self._fire([alarm])
            else:
                fired.append(alarm)

    def _fire(self, alarms: Iterable[Alarm]) -> None:
        for alarm in alarms:
            self.alarms.append(alarm)
            self.unreported.append(alarm)

    def take_unreported(self) -> list[Alarm]:
        alarms, self.unreported = self.unreported, []
        return alarms

    # ----- checkpoints, resume, picture ----------------------------------------------------------------------

    def on_save(self, step: int, checkpoint: str | Path) -> Optional[dict]:
        """After checkpoint-``step`` was saved: point best_checkpoint.json at it when its held-out score beats
        the best so far (rank 0 writes). Returns the current best record."""
        score = self.evals.get(step)
        if score is not None and (self.best is None or score > self.best["score"]):
            self.best = {"checkpoint": str(checkpoint), "step": step, "metric": self.settings.eval_metric,
                         "score": score}
            if self.is_main:
                write_best(self.output_dir, checkpoint, step, self.settings.eval_metric, score)
        return self.best

    def replay(self, log_history: Sequence[Mapping], saved_steps: Sequence[int], checkpoint_dir: Path) -> None:
        """Rebuild the state of a resumed run from its logged metrics (the all-rank means the alarms saw), so
        the baseline, streaks and alarms continue; alarms raised before the resume are reported again once.
        best_checkpoint.json is re-derived from the checkpoints still on disk."""
        for record in sorted(log_history, key=lambda r: r.get("step", 0)):
            step = int(record.get("step", 0))
            self._observe(step, _logged_moments(record), record)
        best = best_saved(sorted(self.evals.items()), saved_steps)
        if best is not None:
            step, score = best
            self.best = {"checkpoint": str(checkpoint_dir / f"checkpoint-{step}"), "step": step,
                         "metric": self.settings.eval_metric, "score": score}
            if self.is_main and read_best(self.output_dir) != self.best:
                write_best(self.output_dir, self.best["checkpoint"], step, self.settings.eval_metric, score)

    def plot(self) -> Optional[Path]:
        """Refresh <output_dir>/monitor.png (rank 0); a failure is logged, never raised (a picture must not end
        a run, nor fail the checkpoint it is drawn after)."""
        if not self.is_main:
            return None
        from .plot import plot_monitor

        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            return plot_monitor(self.output_dir / MONITOR_PNG, self.drift.z_history, self.settings.z,
                                self.divergence.rewards, sorted(self.evals.items()), self.settings.eval_metric,
                                [alarm.as_dict() for alarm in self.alarms])
        except Exception as err:
            logger.warning("could not draw %s: %s: %s", self.output_dir / MONITOR_PNG, type(err).__name__, err)
            return None

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _logged_moments(record: Mapping) -> dict[str, tuple[float, float, int]]:
    """The (sum, sum of squares, count) end_step logged as monitor/<stat>, monitor/sd/<stat>, monitor/n/<stat>
    (sum = n mean, sum of squares = (n - 1) sd^2 + n mean^2); a statistic logged without them is left out."""
    out = {}
    for name in STATS:
        mean, sd, count = (record.get(f"monitor/{key}{name}") for key in ("", "sd/", "n/"))
        if not all(isinstance(v, (int, float)) for v in (mean, sd, count)) or not count or not math.isfinite(mean):
            continue
        n = int(count)
        squares = n * mean * mean + ((n - 1) * sd * sd if n > 1 and math.isfinite(sd) else 0.0)
        out[name] = (n * mean, squares, n)
    return out

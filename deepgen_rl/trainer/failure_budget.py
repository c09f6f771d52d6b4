"""When failing rewards must stop a run, and the run summary printed at its end.

A reward server that dies mid-run used to make every later step "succeed" with all its samples excluded: the run
skipped step after step, kept writing checkpoints and exited 0. The budget (all counts over ALL ranks, so every
rank reaches the same verdict) gives up on a reward when

* it failed on every sample that used it in ``max_failed_steps`` consecutive steps (--max_failed_reward_steps), or
* it failed on more than ``max_failure_rate`` of its samples over the last ``window`` steps
  (--max_reward_failure_rate over --reward_failure_window; judged once the window is full).

Before giving up the trainer re-checks the reward's server (/health). A server that answers again (restarted
by hand or by a supervisor) earns the reward one more budget; a second exhaustion without a step in between in
which the reward worked stops the run whatever /health says.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

logger = logging.getLogger(__name__)

Counts = Mapping[str, tuple[int, int]]  # reward name -> (samples that used it, samples it failed on) in one step


class RewardFailureBudgetExceeded(RuntimeError):
    """A reward kept failing past its budget; the message names the reward, its server and how to start it."""


@dataclass(frozen=True)
class Exhausted:
    """Why the budget of ``reward`` ran out (a sentence fragment: '... failed on every one of ...')."""

    reward: str
    reason: str


@dataclass
class FailureBudget:
    """Consecutive all-failed steps and the windowed failure rate, per reward. 0 / 1.0 disable a limit."""

    max_failed_steps: int
    max_failure_rate: float
    window: int
    streaks: dict[str, int] = field(default_factory=dict)
    rescued: set[str] = field(default_factory=set)
    history: dict[str, deque] = field(default_factory=dict)

    def update(self, step: int, counts: Counts) -> Optional[Exhausted]:
        """Record one step's counts; the first reward whose budget is exhausted, if any."""
        for name, (used, failed) in counts.items():
            if used == 0:
                continue  # the reward had no sample this step: neither a failure nor a success
            all_failed = failed >= used
            self.streaks[name] = self.streaks.get(name, 0) + 1 if all_failed else 0
            if not all_failed:
                self.rescued.discard(name)
            self.history.setdefault(name, deque(maxlen=self.window)).append((used, failed))
        for name in counts:
            verdict = self._verdict(name, step)
            if verdict is not None:
                return verdict
        return None

    def _verdict(self, name: str, step: int) -> Optional[Exhausted]:
        streak = self.streaks.get(name, 0)
        if self.max_failed_steps and streak >= self.max_failed_steps:
            return Exhausted(name, f"failed on every one of its samples in {streak} consecutive steps "
                                   f"(steps {step - streak + 1}-{step}; --max_failed_reward_steps "
                                   f"{self.max_failed_steps})")
        recent = self.history.get(name, ())
        if self.max_failure_rate < 1.0 and len(recent) == self.window:
            used = sum(u for u, _ in recent)
            failed = sum(f for _, f in recent)
            if used and failed / used > self.max_failure_rate:
                return Exhausted(name, f"failed on {failed} of its {used} samples ({100 * failed / used:.0f}%) over "
                                       f"the last {self.window} steps, above --max_reward_failure_rate "
                                       f"{self.max_failure_rate:g}")
        return None

    def can_rescue(self, name: str) -> bool:
        """Whether a healthy /health may buy ``name`` another budget (once per stretch of failures)."""
        return name not in self.rescued

    def rescue(self, name: str) -> None:
        self.rescued.add(name)
        self.streaks[name] = 0
        self.history.pop(name, None)


@dataclass
class RunSummary:
    """What a run (this process, from its start or resume) did: steps trained / skipped, failures per reward."""

    steps_trained: int = 0
    steps_skipped: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    stopped_because: str = ""
    reward_hacking_alarms: list[dict] = field(default_factory=list)  # the monitor's alarms (trainer/hacking.py)

    def add(self, applied: bool, counts: Counts) -> None:
        if applied:
            self.steps_trained += 1
        else:
            self.steps_skipped += 1
        for name, (used, failed) in counts.items():
            self.samples[name] = self.samples.get(name, 0) + used
            self.failed[name] = self.failed.get(name, 0) + failed

    def text(self) -> str:
        rewards = ", ".join(f"{name} {self.failed.get(name, 0)}/{used}" for name, used in self.samples.items())
        line = (f"run summary: {self.steps_trained} step(s) trained, {self.steps_skipped} skipped; failed samples "
                f"per reward: {rewards or 'none scored'}")
        if self.reward_hacking_alarms:
            line += f"; {len(self.reward_hacking_alarms)} reward-hacking alarm(s): " + "; ".join(
                alarm["message"] for alarm in self.reward_hacking_alarms)
        return line + (f"; stopped: {self.stopped_because}" if self.stopped_because else "")

    def write(self, output_dir: str) -> None:
        path = Path(output_dir) / "run_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"steps_trained": self.steps_trained, "steps_skipped": self.steps_skipped,
                                    "samples": self.samples, "failed_samples": self.failed,
                                    "stopped_because": self.stopped_because,
                                    "reward_hacking_alarms": self.reward_hacking_alarms}, indent=1))


def step_counts(names, metrics: Mapping[str, float]) -> dict[str, tuple[int, int]]:
    """(samples that used the reward, samples it failed on) per reward, from a step's all-rank metrics."""
    return {name: (int(metrics.get(f"reward/{name}/num_samples", 0)), int(metrics.get(f"reward/{name}/failed", 0)))
            for name in names}


def budget_verdict(budget: FailureBudget, reward_step, step: int, counts: Counts, failures, device) -> Optional[str]:
    """Update ``budget`` with one step's counts; the message to stop with, or None to go on.

    Collective when a budget runs out (every rank re-checks its own client; any failed re-check stops all ranks).
    ``failures``: this rank's RewardFailure list of the step, for the last error message.
    """
    import torch

    from ..core.distributed import all_reduce_sum

    exhausted = budget.update(step, counts)
    if exhausted is None:
        return None
    name = exhausted.reward
    problem = reward_step.recheck(name)
    down = float(all_reduce_sum(torch.tensor([1.0 if problem else 0.0], dtype=torch.float64), device)[0]) > 0
    if not down and budget.can_rescue(name):
        logger.warning("reward %s %s, but it answers its health check again: going on with a fresh budget.",
                       name, exhausted.reason)
        budget.rescue(name)
        return None
    if problem:
        where = f"re-checked before giving up: {problem}"
    else:
        where = (f"although it answers its health check ({reward_step.rewards[name].service}); last error: "
                 + next((f.message for f in failures if f.reward == name), "none on this rank"))
    return f"reward {name!r} {exhausted.reason}; {where}."


def enforce_budget(budget: FailureBudget, summary: RunSummary, reward_step, step: int, metrics: Mapping[str, float],
                   failures, device, save: Optional[Callable[[], object]]) -> None:
    """Count step ``step`` in the run summary; when a reward has spent its failure budget, checkpoint with ``save``
    (None: --save_strategy no) and raise RewardFailureBudgetExceeded with the reason and the way back."""
    counts = step_counts(reward_step.names, metrics)
    summary.add(metrics.get("train/step_applied") == 1.0, counts)
    message = budget_verdict(budget, reward_step, step, counts, failures, device)
    if message is None:
        return
    if save is not None:
        message += (f" {save()} holds the run up to step {step}: bring the server back, then resume with "
                    "--resume_from_checkpoint latest.")
    message += " (--max_failed_reward_steps / --max_reward_failure_rate set the budget; 0 / 1 disable them.)"
    summary.stopped_because = message
    raise RewardFailureBudgetExceeded(message)

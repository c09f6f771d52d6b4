"""The trainer's side of the reward-hacking monitor (deepgen_rl/monitor/): hand it each step's images, add the
ranks' statistics up, and act on its alarms as --on_reward_hacking says. ``trainer`` below is the
DeepGenGRPOTrainer (grpo_trainer.py imports this module, so it is not imported back).

    warn (default)  a loud warning per alarm (console), the alarm count in the metrics (monitor/alarms), and each
                    alarm in run_summary.json ("reward_hacking_alarms"); training goes on
    stop            as warn, then checkpoint (unless --save_strategy no) and stop with EXIT_REWARD_HACKING (5) and
                    a message naming the alarm, the checkpoint and best_checkpoint.json's checkpoint
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from deepgen_rl.monitor import STATS, MonitorSettings, RewardHackingMonitor

from ..core.distributed import all_reduce_flag, all_reduce_sum
import deepgen_rl.trainer.run_checkpoints as run_checkpoints

if TYPE_CHECKING:
    from .rollout_batch import RolloutBatch

logger = logging.getLogger(__name__)


class RewardHackingStopped(RuntimeError):
    """--on_reward_hacking stop: an alarm fired (the run was checkpointed first)."""


def build_monitor(args, rank: int) -> RewardHackingMonitor:
    return RewardHackingMonitor(MonitorSettings.from_args(args), args.output_dir, is_main=rank == 0)


def submit_images(monitor: RewardHackingMonitor, batch: "RolloutBatch") -> None:
    """Quantise the step's images [N, 3, H, W] in [0, 1] as the rewards see them (uint8) and start the
    statistics on the monitor's thread."""
    images = (batch.images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    monitor.submit(images.permute(0, 2, 3, 1).cpu().numpy(), batch.trajectory.group_ids)


def monitor_metrics(trainer, step: int, metrics: dict) -> dict[str, float]:
    """The step's monitor metrics from every rank's statistics, (sum, sum of squares, count) of the group values
    added up over the ranks (collective: each rank sees the same means and
    so takes the same decisions)."""
    sums = trainer.monitor.step_sums()
    flat = torch.tensor([v for name in STATS for v in sums[name]], dtype=torch.float64)
    total = all_reduce_sum(flat, trainer.device).cpu().tolist()
    reduced = {name: (total[3 * i], total[3 * i + 1], int(total[3 * i + 2])) for i, name in enumerate(STATS)}
    out = trainer.monitor.end_step(step, metrics, reduced)
    if step in trainer.monitor.evals and trainer.rank == 0:  # monitor.png refreshed at each evaluation
        trainer.monitor.plot()
    return out


def act_on_alarms(trainer) -> None:
    """Warn about each new alarm; under --on_reward_hacking stop, checkpoint and raise RewardHackingStopped.

    Under stop it is collective: the drift statistics are all-rank sums, but an evaluation that timed out reports
    each rank's own judgements, so every rank stops when any rank has an alarm (the checkpoint needs them all)."""
    alarms = trainer.monitor.take_unreported()
    args = trainer.args
    stopping = args.on_reward_hacking == "stop"
    if not alarms and not stopping:
        return
    for alarm in alarms:
        trainer.summary.reward_hacking_alarms.append(alarm.as_dict())
        if trainer.rank == 0:
            logger.warning("REWARD HACKING SUSPECTED: %s. Look at the sample grids and %s/monitor.png.",
                           alarm.describe(), args.output_dir)
    if alarms and trainer.rank == 0:
        trainer.monitor.plot()
    if not stopping or not all_reduce_flag(bool(alarms), trainer.device, "max"):
        return
    what = (alarms[0].describe() if alarms
            else "another rank's held-out evaluation (it timed out on some ranks) raised an alarm")
    message = f"reward hacking suspected (--on_reward_hacking stop): {what}."
    if run_checkpoints.save_strategy(args) != "no":
        message += f" {trainer.save()} holds step {trainer.state.global_step}."
    best = trainer.monitor.best
    if best is not None:
        message += (f" The best held-out checkpoint is {best['checkpoint']} (step {best['step']}, {best['metric']} "
                    f"{best['score']:.4g}; best_checkpoint.json): roll back with --resume_from_checkpoint "
                    f"{best['checkpoint']}.")
    else:
        message += " No best checkpoint is recorded (no held-out evaluation ran at a saved step)."
    message += " To train on regardless, resume with --on_reward_hacking warn."
    trainer.summary.stopped_because = message
    raise RewardHackingStopped(message)

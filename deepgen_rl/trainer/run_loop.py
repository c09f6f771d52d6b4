"""The run around the GRPO steps: resume, step until --max_steps, and the faults that end a run early.

A SIGTERM abandons the step in flight at its next safe point (signals.py) and rewinds its prompt draws, so the
checkpoint of the last completed step resumes exactly; a reward that spent its failure budget stops the run after
a checkpoint (failure_budget.py). Whatever ends the run, the trackers are closed and the run summary written.
"""

from __future__ import annotations

import logging
from typing import Optional

from tqdm.auto import tqdm

import deepgen_rl.trainer.checkpointing as checkpointing
import deepgen_rl.trainer.replay as replay
import deepgen_rl.trainer.run_checkpoints as run_checkpoints
import deepgen_rl.trainer.run_folder as run_folder

from ..core.distributed import barrier
from .divergence import TrainingDiverged, stop_message
from .failure_budget import enforce_budget, step_counts
from .grpo_trainer import DeepGenGRPOTrainer
from .hacking import act_on_alarms
from .heartbeat import Heartbeat, watchdog_threshold
from .logging_utils import MetricsLogger
from .signals import GracefulStop, StepInterrupted

logger = logging.getLogger(__name__)


def run(trainer: "DeepGenGRPOTrainer", resume_from_checkpoint: Optional[str]) -> checkpointing.TrainerState:
    """``trainer.train()``: resume when asked, run the steps, checkpoint at the end (or on a stop)."""
    args = trainer.args
    requested = resume_from_checkpoint or args.resume_from_checkpoint
    resume = run_checkpoints.resume_path(args, requested, trainer.device)
    mover = run_checkpoints.is_renamer(args, trainer.engine, trainer.rank)
    replay_step = replay.replay_step_of(args)
    replay.check_replay_flags(replay_step, requested, args.output_dir)
    if resume is not None:
        saved_max_steps = checkpointing.read_trainer_state(resume).max_steps
        trainer.load(resume)
        replay.check_resumed_state(replay_step, trainer.state.global_step, saved_max_steps, trainer.max_steps)
        if replay_step:  # a new folder: the replayed run's own is only read
            run_folder.claim_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, mover=mover)
        else:
            run_folder.abandon_newer(args.output_dir, trainer.state.global_step, mover=mover)
    elif not checkpointing.is_latest_request(requested):  # 'latest' finding none is the same run starting over
        run_folder.claim_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, mover=mover)
    barrier()  # every rank sees the folder as the mover left it
    config = run_checkpoints.run_config(args, world_size=trainer.world_size, trained_modules=trainer.trained_modules,
                                        gradient_accumulation_steps=trainer.plan.gradient_accumulation_steps,
                                        model_flags=trainer.model_flags, lora=trainer.lora)
    trainer.state.run_config = config  # saved with every checkpoint of this run (a resume records its own flags)
    metrics_logger = MetricsLogger(args.output_dir, trainer.tracker, is_main=trainer.rank == 0, run_config=config,
                                   resume_step=trainer.state.global_step)
    bar = tqdm(total=trainer.max_steps, initial=trainer.state.global_step, desc="GRPO",
               disable=trainer.rank != 0 or bool(args.disable_tqdm))
    heartbeat = Heartbeat(args.output_dir, trainer.rank, trainer.world_size,
                          watchdog_threshold(args.stall_report_s, args.ddp_timeout), watch=trainer.rank == 0)
    trainer.timer.on_phase = heartbeat.beat  # each timed phase (and "save") of the step _steps last announced
    try:
        if args.eval_before_train and trainer.state.global_step == 0:  # a fresh run's baseline, not on resume
            trainer._eval_before_train(metrics_logger)
        stopped = _steps(trainer, metrics_logger, bar, heartbeat)
        if stopped or run_checkpoints.save_strategy(args) != "no":
            trainer.save()
    except Exception:
        stall = heartbeat.report(min_wait_s=0.0) if trainer.rank == 0 else None
        if stall:  # e.g. a collective timed out: say which rank the others were waiting for
            logger.error("%s", stall)
        raise
    finally:
        trainer.timer.on_phase = None
        heartbeat.close()
        trainer._stop = None
        bar.close()
        # Closing the logs must never replace the error that ended the run (a full disk fails these writes too).
        _best_effort(metrics_logger.close, "close metrics.jsonl and the trackers")
        if trainer.rank == 0:
            trainer.monitor.plot()  # never raises
            logger.info("%s", trainer.summary.text())
            _best_effort(lambda: trainer.summary.write(args.output_dir), "write run_summary.json")
    return trainer.state


def _best_effort(action, what: str) -> None:
    try:
        action()
    except Exception as err:  # logged, not raised: see the caller
        logger.error("could not %s: %s: %s", what, type(err).__name__, err)


def _steps(trainer: "DeepGenGRPOTrainer", metrics_logger: MetricsLogger, bar, heartbeat: Heartbeat) -> bool:
    """GRPO steps until --max_steps; True when a SIGTERM stopped the run first."""
    with GracefulStop() as stop:
        trainer._stop = stop
        act_on_alarms(trainer)  # alarms a resumed run had raised (the monitor replayed its metrics)
        while trainer.state.global_step < replay.last_step(replay.replay_step_of(trainer.args), trainer.max_steps):
            heartbeat.beat("step start", trainer.state.global_step + 1)
            start = checkpointing.StepStart.capture(trainer.prompt_sampler, trainer.sftaux_sampler)
            try:
                metrics, batch, rewards = trainer.training_step()
            except StepInterrupted as interrupted:
                rewind(trainer, start, str(interrupted))
                return True
            trainer.state.global_step += 1
            trainer._after_step(metrics, batch, rewards, metrics_logger, bar)
            check_divergence(trainer, metrics)
            act_on_alarms(trainer)  # --on_reward_hacking: warn, or checkpoint and stop
            save = trainer.save if run_checkpoints.save_strategy(trainer.args) != "no" else None
            enforce_budget(trainer.failure_budget, trainer.summary, trainer.reward_step, trainer.state.global_step,
                           metrics, rewards.failures, trainer.device, save)
            if stop.should_stop(trainer.device):
                return True
    return False


def check_divergence(trainer: "DeepGenGRPOTrainer", metrics: dict) -> None:
    """Count the step in the skip budget; past --max_skipped_steps stop with the cause and the last good
    checkpoint (no checkpoint is written from diverged weights)."""
    reason = trainer.skip_budget.update(trainer.state.global_step, metrics)
    if reason is None:
        step = trainer.state.global_step
        if trainer.skip_budget.causes and trainer.skip_budget.causes[-1][0] == step and trainer.rank == 0:
            why = trainer.skip_budget.causes[-1][1]
            logger.warning("step %d applied no optimizer step (%s); %d of --max_skipped_steps %d in a row.", step,
                           why, len(trainer.skip_budget.causes), trainer.args.max_skipped_steps)
        return
    trainer.summary.add(False, step_counts(trainer.reward_step.names, metrics))  # the reward budget's count is skipped
    first = trainer.skip_budget.first_skipped_step
    message = stop_message(reason, trainer.args.output_dir, first)
    # Checkpoints saved during the failing steps hold the weights they could not train from: out of 'latest's way.
    moved = run_folder.abandon_newer(trainer.args.output_dir, first - 1, label="diverged",
                                     mover=run_checkpoints.is_renamer(trainer.args, trainer.engine, trainer.rank))
    if moved is not None:
        message += f" The checkpoints saved during the failing steps were moved into {moved}."
    trainer.summary.stopped_because = message
    raise TrainingDiverged(message)


def rewind(trainer: "DeepGenGRPOTrainer", start: checkpointing.StepStart, where: str) -> None:
    """Undo an abandoned step's draws, so the checkpoint of the last completed step resumes exactly."""
    start.restore(trainer.prompt_sampler, trainer.sftaux_sampler)
    if trainer.rank == 0:
        logger.warning("stop requested: step %d abandoned at a safe point (%s, before its optimizer step); "
                       "checkpointing step %d.", trainer.state.global_step + 1, where, trainer.state.global_step)


class TrainingRun(DeepGenGRPOTrainer):
    """The trainer with its run: the steps are grpo_trainer.py's, ``train()`` (this module) drives them. The run
    loop sits above the trainer (it imports grpo_trainer, never the reverse): build_trainer returns this class."""

    def train(self, resume_from_checkpoint: Optional[str] = None) -> checkpointing.TrainerState:
        """Resume when asked, run to --max_steps, checkpoint at the end or on a stop."""
        return run(self, resume_from_checkpoint)

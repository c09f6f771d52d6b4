"""--replay_step N: run exactly GRPO step N of a run from its checkpoint-(N-1), on any world size, into a new folder.

Every draw of a step is keyed by its global position (global_draws.py), and a checkpoint holds the weights, the
optimizer, the LR schedule and the samplers' positions, so step N replayed from checkpoint-(N-1) draws the same
prompts and noise, produces the same images and rewards and applies the same update as the original run did
(docs/reproducibility.md says to what tolerance). The original run folder is only read: the replay writes its
metrics and checkpoint-N into its own --output_dir, which must not be the run's (a resume into the run's folder
would move the run's newer checkpoints aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checkpointing import RESUME_FLAG, checkpoint_step, is_latest_request, resume_requested

REPLAY_FLAG = "--replay_step"


class ReplayError(ValueError):
    """A --replay_step request that cannot replay the step it names."""


def replay_problem(replay_step: int, resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    """Why the flags cannot replay step ``replay_step`` (None when they can, or when the flag is off)."""
    if not replay_step:
        return None
    if replay_step < 0:
        return f"{REPLAY_FLAG} must be >= 1 (0: off); got {replay_step}."
    previous = f"checkpoint-{replay_step - 1}"
    if not resume_requested(resume_from_checkpoint):
        if replay_step == 1:
            return None  # step 1 starts from the initial weights: nothing to resume
        return (f"{REPLAY_FLAG} {replay_step} starts from the run's {previous}: pass {RESUME_FLAG} "
                f"<run output_dir>/{previous}.")
    if is_latest_request(resume_from_checkpoint):
        return (f"{REPLAY_FLAG} needs the checkpoint folder itself, not {RESUME_FLAG} "
                f"{resume_from_checkpoint!r}: pass <run output_dir>/{previous}.")
    checkpoint = Path(str(resume_from_checkpoint)).expanduser()
    step = checkpoint_step(checkpoint)
    if step is not None and step != replay_step - 1:
        return (f"{REPLAY_FLAG} {replay_step} starts from {previous}, but {RESUME_FLAG} is {checkpoint} "
                f"(step {step}): pass <run output_dir>/{previous}, or {REPLAY_FLAG} {step + 1}.")
    if checkpoint.resolve().parent == Path(output_dir).expanduser().resolve():
        return (f"{REPLAY_FLAG} writes into --output_dir {output_dir}, the folder of the run it replays: choose a "
                "new --output_dir (the replay leaves the original run untouched).")
    return None


def check_replay_flags(replay_step: int, resume_from_checkpoint: Optional[str], output_dir: str) -> None:
    problem = replay_problem(replay_step, resume_from_checkpoint, output_dir)
    if problem:
        raise ReplayError(problem)


def check_resumed_state(replay_step: int, global_step: int, saved_max_steps: int, max_steps: int) -> None:
    """After loading the checkpoint: it must be step N - 1 of a run of the same length (the LR schedule)."""
    if not replay_step:
        return
    if global_step != replay_step - 1:
        raise ReplayError(f"{REPLAY_FLAG} {replay_step}: the checkpoint holds step {global_step}, not "
                          f"{replay_step - 1}.")
    if saved_max_steps and saved_max_steps != max_steps:
        raise ReplayError(f"{REPLAY_FLAG} {replay_step}: the run had {saved_max_steps} GRPO steps and these flags "
                          f"give {max_steps}, so the LR schedule would differ: pass the run's own --max_steps / "
                          "--num_train_epochs and --global_batch_size.")
    if replay_step > max_steps:
        raise ReplayError(f"{REPLAY_FLAG} {replay_step} is past the run's last step {max_steps}.")


def last_step(replay_step: int, max_steps: int) -> int:
    """The step the run stops after: N when replaying, else --max_steps."""
    return min(replay_step, max_steps) if replay_step else max_steps


def replay_step_of(args) -> int:
    """--replay_step of ``args`` (0 for stand-in argument objects without it)."""
    return int(getattr(args, "replay_step", 0) or 0)

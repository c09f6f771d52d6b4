"""Atomic ``checkpoint-N`` folders and exact resume (model, optimizer, scheduler, RNG, data position).

Layout of ``<output_dir>/checkpoint-N/`` (a normal DeepSpeed checkpoint folder plus the trainer's files):

    latest                          DeepSpeed tag file: "global_stepN"
    global_stepN/                   engine.save_checkpoint(exclude_frozen_parameters=True): trainable weights
                                    (mp_rank_00_model_states.pt, keys = DeepGenModel state-dict names such as
                                    transformer.*), ZeRO optimizer partitions, LR scheduler
    zero_to_fp32.py                 DeepSpeed's consolidation script (copied by DeepSpeed)
    trainer_state.json              global step, data sampler states, metrics history, run shape, run config
                                    (the run's scalar flags, model and LoRA flags included: what the converter
                                    scripts/utils/rlckpt_to_sftckpt.py reads, e.g. --lora_alpha / --lora_rank)
    rng_state_{rank}.pth            python / numpy / torch / accelerator RNG of each rank
    ema.pt                          with --ema_decay > 0: the fp32 EMA of the trained parameters and its counters
                                    (trainer/ema.py; tensors and numbers only, read weights-only)
    nft_old_policy.pt               with --atrain_algorithm diffusionnft: the old policy's trained parameters and
                                    its schedule counters (trainer/nft.py; read weights-only)

Atomicity: every rank writes into ``tmp-checkpoint-N``; after a barrier one process renames it to
``checkpoint-N`` (a rename within a directory is atomic), then a second barrier. A crash mid-save leaves only a
``tmp-checkpoint-*`` folder, which resume ignores and the next save of that step replaces.

Resume uses DeepSpeed's own ``load_checkpoint`` (strict=False, since frozen weights are not saved and come
from the model paths): no DeepSpeed patch is needed. Every file is read weights-only (``model/safe_load.py``);
``latest`` skips a damaged newest checkpoint (truncated shard, broken JSON) for the previous complete one and says
so; a checkpoint saved under another world size loads only with ``--resume_reset_optimizer``
(``weights_resume.py``). Every load error names the checkpoint folder.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from deepgen_rl.core.distributed import all_reduce, barrier, rank_and_world
from deepgen_rl.model.safe_load import UnsafeCheckpointError, load_weights_only, weights_only_loads
from deepgen_rl.monitor.best import protected_checkpoint

from .optimizer_reshard import ReshardUnsupported, load_resharded_optimizer
from .weights_resume import load_weights_reset_optimizer

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
EMA_STATE_NAME = "ema.pt"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
RESUME_FLAG = "--resume_from_checkpoint"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the message names it, the cause and what was cleaned."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint folder cannot be resumed from; the message names the folder, the file and the way out."""


@dataclass
class TrainerState:
    """What the trainer itself must restore on resume (DeepSpeed restores weights, optimizer, scheduler)."""

    global_step: int = 0
    max_steps: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    prompt_sampler: dict = field(default_factory=dict)
    sftaux_sampler: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)
    # Checked at save (divergence.check_trained_weights): a checkpoint is only written from finite weights, and
    # 'latest' skips one whose record says otherwise. The norm lets a user spot a blow-up between checkpoints.
    weights_finite: bool = True
    trained_weight_norm: Optional[float] = None
    run_config: dict = field(default_factory=dict)  # run_checkpoints.run_config of the run that saved it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to trainer_state.json")


def checkpoint_step(path: Path) -> Optional[int]:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders (with a ``latest`` file), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / "latest").is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p))


def resume_requested(resume_from_checkpoint: Optional[str]) -> bool:
    """Whether --resume_from_checkpoint asks for a resume (a path, or latest/true); empty/None/false/no do not."""
    if resume_from_checkpoint is None:
        return False
    return str(resume_from_checkpoint).strip().lower() not in ("", "false", "none", "no")


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """--resume_from_checkpoint: a checkpoint folder, or "latest"/"true" for the newest one in --output_dir
    that passes :func:`checkpoint_problems` (None when there is none yet, so an auto-restarted job starts fresh),
    or empty/None/"false" for no resume. A damaged newer checkpoint is skipped with a warning saying why."""
    if not resume_requested(resume_from_checkpoint):
        return None
    value = str(resume_from_checkpoint).strip()
    if value.lower() in ("latest", "true", "last", "yes"):
        return newest_good_checkpoint(output_dir, value)
    path = Path(value).expanduser()
    if not (path / "latest").is_file() or not (path / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{RESUME_FLAG} {value!r} is not a complete checkpoint folder (expected 'latest' and "
            f"'{TRAINER_STATE_NAME}' inside, as in <output_dir>/checkpoint-N), or pass 'latest'."
        )
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointLoadError(f"{RESUME_FLAG} {path}: this checkpoint is damaged: " + "; ".join(problems)
                                  + ". Pass an older checkpoint-N folder, or 'latest' to pick the newest good one.")
    return path


def is_latest_request(value: Optional[str]) -> bool:
    return value is not None and str(value).strip().lower() in ("latest", "true", "last", "yes")


def agree_on_checkpoint(path: Optional[Path], output_dir: str | Path, device) -> Optional[Path]:
    """Collective: every rank must resume the same step ('latest' is resolved per rank, e.g. per node)."""
    if rank_and_world()[1] == 1:
        return path
    step = torch.tensor([checkpoint_step(path) if path is not None else -1], dtype=torch.float64)
    low, high = all_reduce(step, device, "min"), all_reduce(step, device, "max")
    if low.item() != high.item():
        raise CheckpointLoadError(
            f"{RESUME_FLAG} latest: ranks found different newest good checkpoints in {output_dir} (steps "
            f"{int(low.item())} and {int(high.item())}; -1 = none): node-local folders that differ? Pass one "
            "checkpoint folder that every node has.")
    return path


def newest_good_checkpoint(output_dir: str | Path, value: str = "latest") -> Optional[Path]:
    """The newest checkpoint-N in ``output_dir`` without problems; warns about each damaged newer one."""
    found = list_checkpoints(output_dir)
    if not found:
        logger.warning("%s %s: no checkpoint-N in %s yet; starting from step 0.", RESUME_FLAG, value, output_dir)
        return None
    skipped = []
    for path in reversed(found):
        problems = checkpoint_problems(path)
        if not problems:
            if skipped:
                logger.warning("%s %s: resuming from %s instead of the newer damaged checkpoint(s): %s",
                               RESUME_FLAG, value, path, " | ".join(skipped))
            return path
        skipped.append(f"{path}: {'; '.join(problems)}")
    raise CheckpointLoadError(
        f"{RESUME_FLAG} {value}: every checkpoint in {output_dir} is damaged: " + " | ".join(skipped)
        + ". Move them away to start from step 0, or pass a checkpoint folder you trust."
    )


def checkpoint_problems(path: Path) -> list[str]:
    """Why ``path`` cannot be resumed from, found without loading tensors: [] when it looks complete.

    Checks the ``latest`` tag and its folder, that trainer_state.json parses and does not record non-finite
    weights (marked at save: no tensor is read here), that the model-states file
    exists, and that every torch file's zip directory reads (a truncated file loses its directory, at the end).
    """
    problems = []
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag or not (path / tag).is_dir():
        problems.append(f"'latest' names {tag!r}, which is not a folder there")
    try:
        state = TrainerState.from_json((path / TRAINER_STATE_NAME).read_text())
        if state.weights_finite is not True:
            problems.append(f"{TRAINER_STATE_NAME} records that its trained weights held NaN/inf when saved")
    except (OSError, ValueError, TypeError) as err:
        problems.append(f"{TRAINER_STATE_NAME} is unreadable ({type(err).__name__}: {err})")
    if tag and (path / tag).is_dir() and not list((path / tag).glob("*model_states.pt")):
        problems.append(f"{tag}/ has no *model_states.pt")
    for file in sorted(path.rglob("*.pt")) + sorted(path.glob("*.pth")):
        try:
            with zipfile.ZipFile(file):
                pass
        except (OSError, zipfile.BadZipFile) as err:
            problems.append(f"{file.relative_to(path)} is not a readable torch file (truncated? {err})")
    return problems


# ----- RNG -----------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every RNG the training loop may touch, as tensors / plain values (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    accelerator = _accelerator()
    if accelerator is not None:
        state["accelerator"] = accelerator.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    accelerator = _accelerator()
    if accelerator is not None and "accelerator" in state:
        accelerator.set_rng_state(state["accelerator"])


def _accelerator():
    """DeepSpeed's accelerator when it is a device with its own RNG (not the CPU)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return None
    accelerator = get_accelerator()
    return None if accelerator.device_name() == "cpu" else accelerator


@dataclass
class StepStart:
    """What a step consumes besides the weights (sampler positions, global RNG), captured at its start so that a
    step abandoned for SIGTERM can be undone and the last completed step checkpointed exactly."""

    prompt_sampler: dict
    sftaux_sampler: Optional[dict]
    rng: dict

    @classmethod
    def capture(cls, prompt_sampler, sftaux_sampler=None) -> "StepStart":
        return cls(prompt_sampler.state_dict(), sftaux_sampler.state_dict() if sftaux_sampler is not None else None,
                   capture_rng_state())

    def restore(self, prompt_sampler, sftaux_sampler=None) -> None:
        prompt_sampler.load_state_dict(self.prompt_sampler)
        if sftaux_sampler is not None and self.sftaux_sampler is not None:
            sftaux_sampler.load_state_dict(self.sftaux_sampler)
        restore_rng_state(self.rng)


# ----- save / load ---------------------------------------------------------------------------------------


def save_checkpoint(engine, output_dir: str | Path, state: TrainerState, *, rank: int, renamer: bool,
                    save_total_limit: Optional[int], ema_state: Optional[dict] = None,
                    extra_states: Optional[dict[str, dict]] = None) -> Path:
    """Collective: every rank calls it. Writes ``checkpoint-{state.global_step}`` atomically; returns its path.

    ``renamer``: whether this process renames the finished folder (global rank 0, or each node's local rank 0
    with node-local storage); it also prunes old checkpoints beyond ``save_total_limit``. ``ema_state``: the EMA's
    ``state_dict()`` (the same on every rank), written by rank 0 as ``ema.pt``. ``extra_states``: {file name: state}
    also written by rank 0 (e.g. DiffusionNFT's old policy, ``nft_old_policy.pt``; tensors and numbers only).
    """
    root = Path(output_dir)
    step = state.global_step
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    # An existing checkpoint-N is replaced: it is from an earlier attempt (the trainer never saves a step twice),
    # possibly the damaged one that 'latest' skipped.
    tmp = root / f"{TMP_PREFIX}{step}"
    if renamer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    error: Optional[BaseException] = None
    try:
        engine.save_checkpoint(str(tmp), tag=f"global_step{step}", exclude_frozen_parameters=True)
        torch.save(capture_rng_state(), tmp / f"rng_state_{rank}.pth")
        if rank == 0:
            (tmp / TRAINER_STATE_NAME).write_text(state.to_json())
            if ema_state is not None:
                torch.save(ema_state, tmp / EMA_STATE_NAME)
            for name, extra in (extra_states or {}).items():
                torch.save(extra, tmp / name)
    except (OSError, RuntimeError) as err:  # a full disk: OSError(ENOSPC), or torch's "file write failed"
        error = err
    # Instead of a barrier: every rank learns whether any rank failed, so none waits for a rank that gave up.
    failed = all_reduce(torch.tensor([0.0 if error is None else 1.0 + rank]), _engine_device(engine), "max")
    if failed.item():
        if renamer:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint behind
        raise CheckpointSaveError(_save_failure(final, tmp, error, int(failed.item()) - 1)) from error
    if renamer:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit:
            rotate_checkpoints(root, save_total_limit, keep=final)
    barrier()
    logger.info("saved %s", final)
    return final


def _engine_device(engine):
    return torch.device(getattr(engine, "device", "cpu") or "cpu")


def _save_failure(final: Path, tmp: Path, error: Optional[BaseException], failed_rank: int) -> str:
    """Why ``final`` was not written: this rank's error (with ENOSPC named), or the rank that failed."""
    if error is None:
        return (f"could not write {final}: rank {failed_rank} failed writing its part into {tmp} (its log has the "
                f"error); {tmp} was removed.")
    code = getattr(error, "errno", None)
    cause = f"{type(error).__name__}: {error}"
    if code is not None:
        cause = f"{errno.errorcode.get(code, code)} ({cause})"
    try:
        free = shutil.disk_usage(final.parent).free
        space = f"; {free / 2**30:.2f} GiB free there now"
    except OSError:
        space = ""
    full = " The disk is full: free space or point --output_dir elsewhere," if code == errno.ENOSPC else ""
    return (f"could not write {final} (into {tmp}): {cause}{space}; {tmp} was removed.{full} Earlier checkpoints "
            f"are intact: resume with {RESUME_FLAG} latest.")


def rotate_checkpoints(output_dir: Path, limit: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``limit`` remain (never ``keep``, nor the checkpoint
    best_checkpoint.json names: the way back from a hacked reward, monitor/best.py)."""
    checkpoints = list_checkpoints(output_dir)
    excess = max(0, len(checkpoints) - limit)
    kept = {p.resolve() for p in (keep, protected_checkpoint(output_dir)) if p is not None}
    removed = []
    for path in checkpoints:
        if len(removed) >= excess:
            break
        if path.resolve() in kept:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def read_trainer_state(path: Path) -> TrainerState:
    try:
        return TrainerState.from_json((path / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointLoadError(f"{path}: {TRAINER_STATE_NAME} is unreadable ({type(err).__name__}: {err}); "
                                  f"pass an older checkpoint to {RESUME_FLAG}.") from err


def read_ema_state(checkpoint_dir: str | Path, source: str = RESUME_FLAG) -> Optional[dict]:
    """The checkpoint's ``ema.pt`` read weights-only, or None when the run had no EMA."""
    path = Path(checkpoint_dir) / EMA_STATE_NAME
    if not path.is_file():
        return None
    try:
        return load_weights_only(path, source=source)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise CheckpointLoadError(f"{path} could not be read ({type(err).__name__}: {err}); pass an older "
                                  f"checkpoint to {source}.") from err


def load_checkpoint(engine, checkpoint_dir: str | Path, *, rank: int, world_size: int = 1,
                    reset_optimizer: bool = False, reshard_optimizer: bool = False) -> TrainerState:
    """Restore weights, optimizer and scheduler (DeepSpeed), this rank's RNG and the trainer state.

    A checkpoint saved under another world size loads weights + schedule with a fresh optimizer when
    ``reset_optimizer`` (--resume_reset_optimizer), with AdamW's moments re-split for this world size when
    ``reshard_optimizer`` (--replay_step; ZeRO-1/2: optimizer_reshard.py), else raises naming both sizes."""
    path = Path(checkpoint_dir)
    state = read_trainer_state(path)
    try:
        if state.world_size != world_size:
            if not reset_optimizer and not reshard_optimizer:
                raise CheckpointLoadError(
                    f"{path} was saved by {state.world_size} processes (world size {state.world_size}); this run "
                    f"has world size {world_size}. DeepSpeed's ZeRO optimizer state is partitioned per process, so it "
                    f"cannot be split anew. Either relaunch on {state.world_size} processes (NNODES x NGPUS), or add "
                    "--resume_reset_optimizer true to load the weights and LR schedule and restart AdamW's moments.")
            tag = (path / "latest").read_text().strip()
            load_weights_reset_optimizer(engine, path, tag)
            if reshard_optimizer and not reset_optimizer:
                try:
                    load_resharded_optimizer(engine, path, tag)
                except ReshardUnsupported as err:
                    raise CheckpointLoadError(
                        f"{path} was saved by {state.world_size} processes and this run has {world_size}: {err}. "
                        f"Replay on {state.world_size} processes, or add --resume_reset_optimizer true (AdamW's "
                        "moments then restart, so the replayed update differs).") from err
            else:
                logger.warning("%s was saved with world size %d; this run has %d: --resume_reset_optimizer loads "
                               "the weights and the LR schedule, and AdamW's moments restart from zero.", path,
                               state.world_size, world_size)
        else:
            with weights_only_loads(path, source=RESUME_FLAG):
                load_path, _ = engine.load_checkpoint(str(path), load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError("DeepSpeed found nothing to load (see its log above)")
    except (CheckpointLoadError, UnsafeCheckpointError):
        raise
    except Exception as err:  # DeepSpeed's and torch's errors do not say which checkpoint: add it
        raise CheckpointLoadError(f"could not resume from {path}: {type(err).__name__}: {err}. Pass an older "
                                  f"checkpoint-N to {RESUME_FLAG}, or 'latest' to pick the newest good one.") from err
    rng_file = path / f"rng_state_{rank}.pth"
    if rng_file.is_file():
        restore_rng_state(load_weights_only(rng_file, source=RESUME_FLAG))
    else:
        logger.warning("%s has no RNG state for rank %d (saved with fewer ranks?); RNG not restored.", path, rank)
    return state

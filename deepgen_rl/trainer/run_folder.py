"""--output_dir belongs to one run: a fresh start never writes over another run's files, and a resume never leaves
checkpoints of an abandoned timeline where ``latest`` or rotation would mistake them for its own.

* Fresh start (no checkpoint resumed) into a folder holding checkpoints or a metrics.jsonl: stop, offering
  ``--resume_from_checkpoint latest`` (go on with that run) or ``--overwrite_output_dir`` (start anew; the old
  run's files are MOVED into ``<output_dir>/archived-<UTC time>/``, never deleted), as HF Trainer users expect.
* Resume from checkpoint-K while checkpoint-M, M > K, exist there (a rollback, or newer damaged ones ``latest``
  skipped): the newer ones and their metrics lines go to ``<output_dir>/abandoned-after-step-K-<UTC time>/``.

Only the process that renames checkpoints (global rank 0, or each node's local rank 0 with node-local storage)
moves files; the others only check.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from .checkpointing import RESUME_FLAG, TMP_PREFIX, checkpoint_step, resume_requested  # noqa: F401 (re-export)
from .logging_utils import METRICS_FILE, REWARD_CURVE_FILE, read_jsonl

logger = logging.getLogger(__name__)

OVERWRITE_FLAG = "--overwrite_output_dir"
RUN_SUMMARY_FILE = "run_summary.json"
# What a run writes into --output_dir besides checkpoints (moved with them when archived).
RUN_FILES = (METRICS_FILE, RUN_SUMMARY_FILE, REWARD_CURVE_FILE, "samples", "swanlog", "wandb", "heartbeats")


class OutputDirInUseError(RuntimeError):
    """A fresh start into a folder that holds another run; the message offers both ways on."""


def _step_of(path: Path) -> Optional[int]:
    """N of checkpoint-N or tmp-checkpoint-N (complete or not), else None."""
    name = path.name
    if name.startswith(TMP_PREFIX) and name[len(TMP_PREFIX):].isdigit():
        return int(name[len(TMP_PREFIX):])
    return checkpoint_step(path)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every checkpoint-N and tmp-checkpoint-N folder directly in ``output_dir``, by step."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: (_step_of(p), p.name))


def earlier_run(output_dir: Path) -> list[Path]:
    """The files that show another run used ``output_dir``: its checkpoints and a non-empty metrics.jsonl."""
    metrics = output_dir / METRICS_FILE
    return checkpoint_folders(output_dir) + ([metrics] if metrics.is_file() and metrics.stat().st_size else [])


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _free_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... when a folder of that name exists (two moves in one second)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def claim_output_dir(output_dir: str | Path, *, overwrite: bool, mover: bool) -> Optional[Path]:
    """A fresh start: stop if another run's files are in ``output_dir``, or with ``overwrite`` archive them (only
    when ``mover``). Returns the archive folder (None when nothing was there or this process does not move)."""
    root = Path(output_dir)
    if overwrite and not mover:  # the mover archives; scanning while it moves files could trip over them
        return None
    found = earlier_run(root)
    if not found:
        return None
    if not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise OutputDirInUseError(
            f"--output_dir {root} already holds another run ({names}), and this run starts from step 0: its "
            f"checkpoints and metrics would be overwritten or rotated away. Continue that run with {RESUME_FLAG} "
            f"latest, or pass {OVERWRITE_FLAG} true to start anew (the earlier run's files are moved into "
            f"{root}/archived-<time>/, not deleted), or choose another --output_dir.")
    if not mover:
        return None
    archive = _free_folder(root / f"archived-{_stamp()}")
    archive.mkdir(parents=True)
    for path in checkpoint_folders(root) + [root / name for name in RUN_FILES]:
        if path.exists():
            shutil.move(str(path), str(archive / path.name))
    logger.warning("%s: the earlier run's files in %s were moved into %s.", OVERWRITE_FLAG, root, archive)
    return archive


def abandon_newer(output_dir: str | Path, step: int, *, mover: bool, label: str = "abandoned") -> Optional[Path]:
    """Resuming step ``step``: move the checkpoints of later steps (and their metrics.jsonl lines) out of the run's
    timeline into ``<label>-after-step-<step>-<time>/``. Returns that folder (None when there were none)."""
    root = Path(output_dir)
    newer = [p for p in checkpoint_folders(root) if _step_of(p) > step]
    if not newer or not mover:
        return None
    folder = _free_folder(root / f"{label}-after-step-{step}-{_stamp()}")
    folder.mkdir(parents=True)
    for path in newer:
        shutil.move(str(path), str(folder / path.name))
    metrics = root / METRICS_FILE
    if metrics.is_file():
        later = [r for r in read_jsonl(metrics) if r.get("step", 0) > step]
        (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in later), encoding="utf-8")
    logger.warning("checkpoints after step %d (%s) were moved into %s, so --save_total_limit and 'latest' only "
                   "see the run's timeline up to step %d.", step, ", ".join(p.name for p in newer), folder, step)
    return folder

"""``<output_dir>/best_checkpoint.json``: the checkpoint with the best held-out score so far, so a run that hacked
its reward can be rolled back (``--resume_from_checkpoint <its path>``, or convert it). Checkpoint rotation
(--save_total_limit) never deletes the checkpoint it names (``protected_checkpoint``).

    {"checkpoint": "<output_dir>/checkpoint-40", "step": 40, "metric": "eval/unigenbench/overall", "score": 0.61}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

BEST_CHECKPOINT_NAME = "best_checkpoint.json"


def read_best(output_dir: str | Path) -> Optional[dict]:
    """The record, or None when there is none (or it is unreadable: then nothing is protected)."""
    try:
        record = json.loads((Path(output_dir) / BEST_CHECKPOINT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "checkpoint" in record else None


def protected_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The checkpoint folder best_checkpoint.json names (rotation keeps it), or None."""
    record = read_best(output_dir)
    return None if record is None else Path(record["checkpoint"])


def write_best(output_dir: str | Path, checkpoint: str | Path, step: int, metric: str, score: float) -> dict:
    """Write the record atomically (a reader never sees half a file)."""
    record = {"checkpoint": str(checkpoint), "step": int(step), "metric": metric, "score": float(score)}
    path = Path(output_dir) / BEST_CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


def best_saved(evals: Sequence[tuple[int, float]], saved_steps: Sequence[int]) -> Optional[tuple[int, float]]:
    """(step, score) of the best finite held-out score among the steps that have a checkpoint (the earliest of
    equal scores), or None."""
    saved = set(saved_steps)
    candidates = [(step, score) for step, score in evals if step in saved and math.isfinite(score)]
    if not candidates:
        return None
    return max(candidates, key=lambda item: (item[1], -item[0]))

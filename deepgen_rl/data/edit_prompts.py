"""Edit datasets: a JSONL prompt file, one edit per line (a dataset YAML entry whose ``path`` ends in ``.jsonl``).

    {"instruction": "make the sky purple", "source_images": ["images/0001.png"], "target_text": "OPEN"}

* ``instruction`` (required, non-empty): what the LLM reads after the source images (model/prompt_format.py).
* ``source_images`` (required, non-empty list): image files, relative to the JSONL file (absolute allowed); the
  first is the image being edited, further ones are references (e.g. "put the hat of image 2 on the cat").
* ``target_text`` (optional): the text the result must show, for text-editing rewards.

Errors name the file, the line and the key. Image files are checked when the file is read (a missing image fails
then, naming it); they are decoded only when a sample is drawn (``load_source_image``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

EDIT_FILE_SUFFIX = ".jsonl"
_KEYS = {"instruction", "source_images", "target_text"}


@dataclass(frozen=True)
class EditPrompt:
    instruction: str
    source_images: tuple[Path, ...]  # absolute paths, first = the image being edited
    target_text: Optional[str] = None
    line: int = 0  # 1-based line of the JSONL file (0: not read from a file), for messages naming it


def _bad(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}:{line}: {message}")


def parse_edit_line(path: Path, line: int, text: str) -> EditPrompt:
    """One JSONL line -> EditPrompt (paths resolved against the file's folder; images must exist)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _bad(path, line, f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise _bad(path, line, f"expected a JSON object with instruction and source_images, got {record!r}")
    extra = sorted(set(record) - _KEYS)
    if extra:
        raise _bad(path, line, f"unknown key {extra[0]!r}; allowed: {', '.join(sorted(_KEYS))}")
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _bad(path, line, f"'instruction' must be a non-empty string, got {instruction!r}")
    sources = record.get("source_images")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise _bad(path, line, f"'source_images' must be a non-empty list of image paths, got {sources!r}")
    resolved = tuple(p if p.is_absolute() else (path.parent / p).resolve() for p in map(Path, sources))
    for image in resolved:
        if not image.is_file():
            raise _bad(path, line, f"source image {image} not found (paths are relative to the JSONL file)")
    target = record.get("target_text")
    if target is not None and not isinstance(target, str):
        raise _bad(path, line, f"'target_text' must be a string when given, got {target!r}")
    return EditPrompt(instruction.strip(), resolved, target, line)


def read_edit_file(path: Path, dataset: str) -> list[EditPrompt]:
    """Every non-blank line of an edit JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"edit file {path} not found (dataset {dataset!r}): fix its 'path' (relative to "
                                "the YAML) or remove the dataset from the config.")
    lines = path.read_text(encoding="utf-8").splitlines()
    edits = [parse_edit_line(path, number, text) for number, text in enumerate(lines, 1) if text.strip()]
    if not edits:
        raise ValueError(f"edit file {path} has no edits (dataset {dataset!r}).")
    return edits


def reference_size(height: int, width: int, target_area: int, multiple: int) -> tuple[int, int]:
    """(H, W) with the source's aspect ratio, area ~ ``target_area`` and both sides multiples of ``multiple``
    (at least one ``multiple``): a source is resized to the scale the run generates at."""
    scale = math.sqrt(target_area / (height * width))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def load_source_image(path: Path, target_area: int, multiple: int) -> torch.Tensor:
    """Decode, convert to RGB and resize (bicubic) a source image -> [3, H, W] float in [0, 1]."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    height, width = reference_size(rgb.height, rgb.width, target_area, multiple)
    resized = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

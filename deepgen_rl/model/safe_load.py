"""Weights-only loading of our checkpoints: a pickled payload in a checkpoint folder must never run.

``torch.load(weights_only=False)`` (what DeepSpeed's checkpoint loaders and its ``zero_to_fp32`` reader pass)
unpickles arbitrary objects, so a ``.pt`` dropped into a checkpoint folder runs code on resume or conversion.
Every load of a checkpoint goes through here instead:

* ``load_weights_only(path, source=...)`` for files we read ourselves (CHECKPOINT, plain state dicts, RNG files);
* ``weights_only_loads(folder, source=...)`` around DeepSpeed's own readers: inside it torch forces every
  ``torch.load`` to weights-only (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, honoured by torch even over an explicit
  ``weights_only=False``), with the few DeepSpeed classes its optimizer shards hold allow-listed.

A refused file raises :class:`UnsafeCheckpointError` naming the file, the flag / variable it came from and the
refused global, instead of torch's advice to re-run with ``weights_only=False``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# Plain data classes DeepSpeed pickles into ZeRO optimizer shards (seen in 0.19.8 ZeRO-2/3 checkpoints):
# rebuilding them sets attributes only; no constructor or method of theirs runs.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
TORCH_FILE_SUFFIXES = (".pt", ".pth", ".bin")
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects outside the allow-list; it was not loaded."""


def allowed_globals() -> list[Any]:
    """The allow-listed classes that can be imported here (a DeepSpeed without one simply never pickles it)."""
    found = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module_name, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue
    return found


def refusal_message(path: str | Path, source: str, err: BaseException) -> str:
    match = _GLOBAL_RE.search(str(err))
    what = f"the pickled object {match.group(1)}" if match else "pickled Python objects"
    return (f"refused to load {path} (from {source}): it holds {what}, which is not tensors or an allow-listed "
            "DeepSpeed class, and unpickling it could run arbitrary code. Only load checkpoints your own runs wrote; "
            "if this file is yours, it was altered or written by another program: delete it or point "
            f"{source} at another checkpoint.")


def load_weights_only(path: str | Path, *, source: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; ``source`` names the flag or variable."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(refusal_message(path, source, err)) from None


def find_refused_files(folder: str | Path) -> list[tuple[Path, str]]:
    """(file, refused global) for every torch file under ``folder`` holding a non-allow-listed global.

    Reads only the pickle opcodes (``get_unsafe_globals_in_checkpoint``), never the tensors or the objects."""
    allowed = set(DEEPSPEED_SAFE_GLOBALS)
    refused = []
    for path in sorted(Path(folder).rglob("*")):
        if not (path.is_file() and path.suffix in TORCH_FILE_SUFFIXES):
            continue
        try:
            unsafe = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if name not in allowed]
        except Exception:  # not a torch zip file: a load error of its own, reported by the caller
            continue
        if unsafe:
            refused.append((path, unsafe[0]))
    return refused


@contextmanager
def weights_only_loads(folder: str | Path, *, source: str) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only with the allow-list (DeepSpeed's readers included).

    On a refusal the folder is scanned to name the offending file (torch's error does not name it)."""
    previous = os.environ.get(_FORCE_ENV)
    os.environ[_FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError:
        refused = find_refused_files(folder)
        if not refused:
            raise  # not a refusal (a damaged pickle): the caller names the folder
        path, name = refused[0]
        raise UnsafeCheckpointError(
            refusal_message(path, source, RuntimeError(f"Unsupported global: GLOBAL {name}"))) from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE_ENV, None)
        else:
            os.environ[_FORCE_ENV] = previous

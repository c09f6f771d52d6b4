"""Preflight checks of what the input FILES contain (``deepgen_rl.preflight`` checks that they exist).

Each of these inputs used to pass start-up and fail later, after every rank had loaded the models or, worse,
never fail at all (issue 11 item 10):

* an empty prompt file, or one that is not UTF-8;
* an OCR dataset whose prompts carry no double-quoted target text (an edit: no ``target_text`` either): every
  ``ocr`` score of such a prompt fails,
  so an OCR-only dataset skips every step and the run "succeeds" without training;
* an eval CSV whose ``sub_dims`` JSON is broken (found only at the first evaluation);
* a CHECKPOINT that torch refuses to load weights-only (pickled code, a truncated or foreign file).

Every problem names the file and, for line-oriented files, the line (1-based, as an editor shows it). Nothing
here loads a model: the CHECKPOINT is opened memory-mapped, so its tensors are not read.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

from ..config import CHECKPOINT_ENV
from ..data.dataset_yaml import DatasetConfig, DatasetEntry
from ..data.edit_prompts import read_edit_file
from ..rewards.ocr_scoring import extract_targets

# What torch's refusal names, e.g. "Unsupported global: GLOBAL argparse.Namespace was not an allowed global ...".
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)")
# Lines quoted per file in a message; the rest are counted.
MAX_LINES_NAMED = 5


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line; UnicodeDecodeError names the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UnicodeDecodeError(err.encoding, err.object, err.start, err.end,
                                 f"{err.reason} on line {line}") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _named(path: Path, numbers: list[int]) -> str:
    shown = ", ".join(f"{path}:{n}" for n in numbers[:MAX_LINES_NAMED])
    more = len(numbers) - MAX_LINES_NAMED
    return shown + (f" and {more} more line(s)" if more > 0 else "")


def check_prompt_file(entry: DatasetEntry, config_source: Path) -> list[str]:
    """Problems of one dataset's prompt file: unreadable, empty, or OCR prompts without a quoted target."""
    where = f"dataset {entry.name!r} of {config_source}"
    if not entry.path.is_file():
        return []  # reported by the dataset YAML check, naming the file
    if entry.is_edit:
        return check_edit_file(entry, where)
    try:
        lines = numbered_lines(entry.path)
    except UnicodeDecodeError as err:
        return [f"prompt file {entry.path} ({where}) is not UTF-8 text: {err.reason}; re-save it as UTF-8."]
    if not lines:
        return [f"prompt file {entry.path} ({where}) is empty: it needs one prompt per line; fill it or remove the "
                "dataset from the YAML."]
    if entry.rewards.get("ocr", 0.0) <= 0:
        return []
    untargeted = [number for number, prompt in lines if not extract_targets(prompt)]
    if not untargeted:
        return []
    return [f"{len(untargeted)} of {len(lines)} prompts of {where} have no double-quoted target text, which its "
            f"ocr reward (weight {entry.rewards['ocr']:g}) scores against, so every such sample would fail: "
            f"{_named(entry.path, untargeted)}. Quote the text to render (a sign reading \"OPEN\") or drop the ocr "
            "reward from that dataset."]


def check_edit_file(entry: DatasetEntry, where: str) -> list[str]:
    """An edit JSONL is parsed as training would read it (errors name file, line and key); with an ``ocr`` reward
    every edit needs a target: its ``target_text``, else a double-quoted span of its instruction (what the OCR
    reward falls back to), or every ocr score of that edit fails."""
    try:
        edits = read_edit_file(entry.path, entry.name)
    except (ValueError, FileNotFoundError) as err:  # UnicodeDecodeError is a ValueError
        return [f"edit file of {where}: {err}"]
    if entry.rewards.get("ocr", 0.0) <= 0:
        return []
    untargeted = [edit.line for edit in edits if edit.target_text is None and not extract_targets(edit.instruction)]
    if not untargeted:
        return []
    return [f"{len(untargeted)} of {len(edits)} edits of {where} have no target text for its ocr reward (weight "
            f"{entry.rewards['ocr']:g}), so every such sample would fail: {_named(entry.path, untargeted)}. Give each "
            "a \"target_text\" (the text the edited image must show) or drop the ocr reward from that dataset."]


def check_prompt_contents(dataset: DatasetConfig) -> list[str]:
    return [problem for entry in dataset.datasets for problem in check_prompt_file(entry, dataset.source)]


def check_eval_contents(eval_config: str) -> Optional[str]:
    """The eval YAML and every UniGenBench CSV and edit JSONL it names, parsed as the evaluation will (errors name
    file + line)."""
    from ..eval.dataset import EvalDataError, load_eval_datasets
    from ..eval.edit_eval import load_edit_eval_sets

    try:
        load_eval_datasets(eval_config)
        load_edit_eval_sets(eval_config)
    except EvalDataError as err:
        return (f"EVAL_DATASET_CONFIG (--eval_dataset_config): {err} (fix the file, or pass --eval_freq 0 to "
                "train without periodic evaluation)")
    return None


def unpickler_reason(message: str) -> str:
    """The one line of torch's weights-only refusal that says WHAT was refused (its advice to re-run with
    weights_only=False is exactly what a user must not do with a file of unknown origin)."""
    found = _UNPICKLER_REASON.search(message)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


# torch.save writes a zip archive (torch >= 1.6: a local file header "PK\x03\x04" first, even when the file was cut
# short) or, in the legacy format, a pickle stream: protocol 2+ starts with the PROTO opcode 0x80.
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def not_a_torch_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a torch.save file (text, an image, ...), judged from its first bytes; None when it may
    be one. WHY: torch's unpickler reads any other file as a pickle and refuses it as "unsupported global", which
    reads as a file that pickles code."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_TORCH_FILE_STARTS):
        return None
    if not head:
        return "the file is empty, not a torch checkpoint: copy it again or point CHECKPOINT at the right .pth."
    try:
        kind = f"text ({head.decode('utf-8').splitlines()[0][:40]!r}...)"
    except UnicodeDecodeError:
        kind = f"bytes {head[:8]!r}"
    return (f"not a torch checkpoint: it starts with {kind}, while a torch.save file is a zip archive (or a "
            "legacy pickle); point CHECKPOINT at the DeepGen_Image pretraining .pth.")


def check_checkpoint_loads(path: str) -> Optional[str]:
    """Open CHECKPOINT as the loader will (``torch.load(weights_only=True)``), memory-mapped: no tensor is read."""
    import torch

    where = f"{CHECKPOINT_ENV} (--checkpoint) = {path}"
    problem = not_a_torch_file(path)
    if problem:
        return f"{where}: {problem}"
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format cannot be mapped
    except pickle.UnpicklingError as err:
        reason = unpickler_reason(str(err))
        return (f"{where}: torch refuses to load it weights-only ({reason[:300]}). It pickles objects other than "
                "tensors and plain containers, which could run code on load; re-save it from a trusted Python "
                "session as a plain state dict: torch.save({name: tensor, ...}, 'clean.pth').")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        return (f"{where}: not a readable torch checkpoint ({type(err).__name__}: {str(err)[:300]}); the file is "
                "truncated or not written by torch.save: copy it again or point CHECKPOINT at the right .pth.")
    return None


class InputContentError(ValueError):
    """An input file's contents would fail the run later; the message lists every problem found."""


def content_problems(dataset: DatasetConfig, checkpoint: str, eval_config: str) -> list[str]:
    """Every content problem of the prompt files, CHECKPOINT (when set) and the eval CSVs (when ``eval_config``
    names a file; empty when evaluation is off)."""
    problems = check_prompt_contents(dataset)
    if checkpoint and Path(checkpoint).expanduser().is_file():
        problems += [p for p in [check_checkpoint_loads(str(Path(checkpoint).expanduser()))] if p]
    if eval_config and Path(eval_config).is_file():
        problems += [p for p in [check_eval_contents(eval_config)] if p]
    return problems


def require_valid_contents(dataset: DatasetConfig, checkpoint: str, eval_config: str) -> None:
    """Raise InputContentError listing every problem (the entry point calls this before loading any model, for
    runs launched without ``scripts/train.sh``'s preflight)."""
    problems = content_problems(dataset, checkpoint, eval_config)
    if problems:
        raise InputContentError(f"{len(problems)} input file problem(s) stop the run before any model loads:\n"
                                + "\n".join(f"  - {problem}" for problem in problems))

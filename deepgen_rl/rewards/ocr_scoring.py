"""OCR reward from recognised text: pure functions, no OCR engine here (the server runs the engine).

The reward follows the DeepGen-RL reference (docs/upstream_compatibility.md#ocr):

* targets = every double-quoted span of the prompt (``'a sign reading "OPEN 24 HOURS"'`` -> ``OPEN 24 HOURS``);
* texts are normalised: whitespace removed; by default punctuation/symbols removed and case folded;
* the recognised tokens (boxes of the OCR engine, top-to-bottom) give candidates: each token, each run of up to
  ``ngram_max`` adjacent tokens, and all tokens joined; a target's distance is the smallest Levenshtein
  distance to any candidate, optionally also after folding OCR-confusable characters (O/0, l/1/I, ...);
* per target  r_t = 1 - min(1, d_t / len_t);  reward = sum_t len_t r_t / sum_t len_t  (length-weighted mean).

Departures from the reference, on purpose: punctuation removal keeps letters of every script (the reference
keeps only ASCII letters and digits, which erases Chinese targets), case folding is on by default
(docs/upstream_compatibility.md#ocr; the reference default is case-sensitive, ``case_sensitive=True`` restores it)
and a prompt without a quoted target is an error (the reference scores it 0, a fake reward).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

_QUOTED = re.compile(r'"([^"]*)"')  # '*' not '+': an empty pair "" must not shift the pairing
_WHITESPACE = re.compile(r"\s+")

# OCR engines confuse these in stylised fonts; folding both sides to one representative lowers reward noise
# without hiding real misspellings (reference table, applied to case-folded text).
_CONFUSABLE = str.maketrans({"0": "o", "1": "l", "i": "l", "j": "l", "5": "s", "v": "w"})


@dataclass(frozen=True)
class OcrScoringOptions:
    """Scoring switches (the server exposes each as a flag and an environment variable)."""

    case_sensitive: bool = False
    ignore_punctuation: bool = True
    confusion_fold: bool = True
    min_confidence: float = 0.0
    ngram_max: int = 3

    def __post_init__(self) -> None:
        if self.ngram_max < 1:
            raise ValueError(f"ngram_max must be >= 1; got {self.ngram_max}.")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1]; got {self.min_confidence}.")


@dataclass(frozen=True)
class OcrToken:
    """One text box recognised by the engine."""

    text: str
    confidence: float


class NoTargetError(ValueError):
    """The prompt has no (scorable) double-quoted target text."""


def extract_targets(prompt: str) -> list[str]:
    """Every double-quoted span of ``prompt`` that is not blank, in order."""
    return [span for span in _QUOTED.findall(prompt) if span.strip()]


def normalize_text(text: str, options: OcrScoringOptions) -> str:
    """Remove whitespace; optionally punctuation/symbols (Unicode categories P*, S*) and case."""
    text = _WHITESPACE.sub("", unicodedata.normalize("NFKC", text))
    if options.ignore_punctuation:
        text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PS")
    if not options.case_sensitive:
        text = text.casefold()
    return text


def fold_confusables(text: str) -> str:
    """Map confusable lower-case characters to one representative (case is left to ``case_sensitive``)."""
    return text.translate(_CONFUSABLE)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1); O(len(a) len(b)) time, two rows."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def candidate_strings(tokens: Sequence[str], ngram_max: int) -> list[str]:
    """Normalised tokens, runs of 2..ngram_max adjacent tokens, and all tokens joined (deduplicated, in order)."""
    tokens = [token for token in tokens if token]
    candidates = list(tokens)
    for n in range(2, min(ngram_max, len(tokens)) + 1):
        candidates.extend("".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    if tokens:
        candidates.append("".join(tokens))
    return list(dict.fromkeys(candidates))


def best_distance(target: str, candidates: Sequence[str], confusion_fold: bool) -> int:
    """Smallest edit distance from ``target`` to a candidate, capped at len(target) (no candidate = len)."""
    best = len(target)
    folded_target = fold_confusables(target) if confusion_fold else target
    for candidate in candidates:
        distance = levenshtein(candidate, target)
        if confusion_fold:
            distance = min(distance, levenshtein(fold_confusables(candidate), folded_target))
        best = min(best, distance)
        if best == 0:
            break
    return best


def ocr_reward(targets: Sequence[str], tokens: Sequence[OcrToken], options: OcrScoringOptions) -> float:
    """Length-weighted mean over targets of 1 - min(1, d / len) (see the module docstring). In [0, 1].

    Raises NoTargetError when no target survives normalisation (e.g. only punctuation in the quotes).
    """
    kept = [token.text for token in tokens if token.confidence >= options.min_confidence]
    candidates = candidate_strings([normalize_text(text, options) for text in kept], options.ngram_max)
    weighted, total_length = 0.0, 0
    for target in targets:
        normalized = normalize_text(target, options)
        if not normalized:
            continue
        distance = best_distance(normalized, candidates, options.confusion_fold)
        weighted += len(normalized) * (1.0 - distance / len(normalized))
        total_length += len(normalized)
    if total_length == 0:
        raise NoTargetError(f"no scorable target text in {list(targets)!r} after normalisation")
    return weighted / total_length

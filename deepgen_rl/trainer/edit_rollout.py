"""The trainer's share of editing: whether a run needs the vision tower, and each step's source conditioning.

Legend: B prompts of this rank, G = rollout_n, N = B * G rows. An edit prompt's sources are decoded and
VAE-encoded once per step (sampling/edit_conditioning.py) and carried by the Trajectory to the rewards and to
every recompute; a text-to-image step builds nothing (its path is unchanged).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from deepgen_rl.data.prompts import PromptSample
from deepgen_rl.sampling.edit_conditioning import EditConditioning, build_edit_conditioning


def has_edit_datasets(prompt_sampler) -> bool:
    """True when a dataset of the run's YAML is an edit JSONL: the LLM then needs its vision tower."""
    config = getattr(prompt_sampler, "config", None)
    return config is not None and any(entry.is_edit for entry in config.datasets)


def step_edit_conditioning(model, samples: Sequence[PromptSample], group_size: int, height: int,
                           width: int) -> Optional[EditConditioning]:
    """N rows of source conditioning when a sample is an edit (sources resized to ~ height * width pixels, the
    area the run generates at), else None."""
    if not any(sample.is_edit for sample in samples):
        return None
    with torch.no_grad():
        return build_edit_conditioning(model, samples, group_size, height * width)


def row_sources(edit: Optional[EditConditioning], rows: slice | None = None) -> Optional[list]:
    """Per row (of ``rows``) its sources as PIL images for rewards with ``needs_sources``; None without edits."""
    if edit is None:
        return None
    picked = edit if rows is None else edit.select(range(len(edit))[rows])
    return picked.source_pil()


def row_targets(samples: Sequence[PromptSample], group_size: int) -> Optional[list]:
    """Per row (N) its explicit target text (an edit's ``target_text``, else None) for rewards with
    ``needs_targets`` (ocr); None when no sample has one (the prompts' quoted spans serve)."""
    if all(sample.target_text is None for sample in samples):
        return None
    return [sample.target_text for sample in samples for _ in range(group_size)]

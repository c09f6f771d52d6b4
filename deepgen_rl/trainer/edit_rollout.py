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


def group_sources(edit: Optional[EditConditioning], group_size: int, height: int,
                  width: int) -> Optional[torch.Tensor]:
    """The sample grid's source column: per prompt (B) its first source resized to the H x W tile -> [B, 3, H, W]
    in [0, 1] (a text-to-image prompt: a black tile); None when no prompt is an edit (the grid is unchanged)."""
    if edit is None or not edit.edit_rows:
        return None
    tiles = torch.zeros(len(edit) // group_size, 3, height, width)
    for prompt in range(len(tiles)):
        sources = edit.source_images[prompt * group_size]
        if sources:
            tiles[prompt] = torch.nn.functional.interpolate(sources[0][None].float().cpu(), size=(height, width),
                                                            mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return tiles


def prepend_sources(images: torch.Tensor, sources: torch.Tensor, group_size: int) -> torch.Tensor:
    """images [B * G, 3, H, W] and sources [B, 3, H, W] -> [B * (G + 1), 3, H, W]: each group's row starts with its
    source, then its G edits."""
    rows = images.detach().float().cpu().reshape(len(sources), group_size, *images.shape[1:])
    return torch.cat([sources[:, None], rows], dim=1).flatten(0, 1)

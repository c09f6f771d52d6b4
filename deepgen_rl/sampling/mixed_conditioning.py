"""Conditioning of a rollout that mixes text-to-image and edit prompts.

Legend: B prompts, G group size, N = B * G rows (a prompt's G rows adjacent), L_t / L_e text / edit prompt
embedding lengths.

Edit and text-to-image prompts are encoded in SEPARATE LLM forwards, as DeepGen encodes them (its ``generate``
takes one kind per call, its SFT one loss per kind): an edit prompt carries hundreds of ``<|image_pad|>`` tokens,
and the whole left-padded sequence goes through the connector while SD3's joint attention does not mask text
padding, so batching the kinds together would change every text-to-image row's embeddings (and a
text-to-image-only batch must stay bit-identical). Each kind's CFG negatives ride in ITS forward (left-padded with
its positives, model/deepgen.py): ``chat_text("")`` for text-to-image, each edit's sources with an empty
instruction for edits. The two kinds therefore have different lengths (L_t != L_e) and cannot share one
[n, L, D] tensor: :class:`MixedConditioning` keeps one homogeneous :class:`Conditioning` per kind with the
positions of its rows, and ``guided_velocity`` runs one DiT forward per kind present in a micro-batch. Rollout,
recompute and training select the same rows, so they run the same forwards on the same batch compositions (the
first chunk's ratio stays 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from deepgen_rl.sampling.edit_conditioning import EditConditioning
from deepgen_rl.sampling.trajectory import Conditioning, Rows, repeat_groups


@dataclass(frozen=True)
class MixedConditioning:
    """n rows of both kinds: ``parts`` holds, per kind present, (positions [n_k] int64 CPU of its rows among the
    n, its Conditioning of n_k rows); the positions of all parts partition range(n)."""

    parts: tuple[tuple[Tensor, Conditioning], ...]
    num_rows: int

    def select(self, rows: Rows) -> "MixedConditioning":
        """The conditioning of ``rows`` (slice, index list or index tensor), in that order."""
        kind = torch.empty(self.num_rows, dtype=torch.long)
        local = torch.empty(self.num_rows, dtype=torch.long)
        for k, (positions, _) in enumerate(self.parts):
            kind[positions] = k
            local[positions] = torch.arange(len(positions))
        if isinstance(rows, Tensor):
            rows = rows.cpu()
        picked = torch.arange(self.num_rows)[rows]  # [n'] global row of each selected position
        parts = []
        for k, (_, cond) in enumerate(self.parts):
            mask = kind[picked] == k
            if bool(mask.any()):
                parts.append((mask.nonzero().flatten(), cond.select(local[picked[mask]])))
        return MixedConditioning(tuple(parts), len(picked))

    def combine(self, velocity_of: Callable[[Tensor, Conditioning], Tensor], like: Tensor) -> Tensor:
        """Run ``velocity_of(positions, part)`` per part and scatter the results into one [n, ...] fp32 tensor
        (out-of-place, so gradients reach every part)."""
        out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        for positions, cond in self.parts:
            index = positions.to(like.device)
            out = out.index_copy(0, index, velocity_of(index, cond))
        return out


def encode_kind(model, prompts: Sequence[str], sources: Optional[list], group_size: int,
                cfg_scale: float) -> Conditioning:
    """B prompts of one kind (``sources``: per prompt its source images for edits, None for text-to-image) in one
    LLM forward with their CFG negatives (cfg_scale > 0), repeated G times -> a Conditioning of B * G rows (no
    references: the caller adds them). The text-to-image negative is one row, expanded (a view)."""
    if cfg_scale <= 0:
        embeds, pooled = (model.encode_prompt(list(prompts)) if sources is None
                          else model.encode_edit_prompt(list(prompts), sources))  # [B, L, D], [B, D']
        neg = neg_pooled = None
    elif sources is None:
        embeds, pooled, neg_one, neg_pooled_one = model.encode_prompt_and_negative(list(prompts))  # negative: 1 row
        rows = len(prompts) * group_size
        neg, neg_pooled = neg_one.expand(rows, *neg_one.shape[1:]), neg_pooled_one.expand(rows, -1)
    else:
        embeds, pooled, neg, neg_pooled = model.encode_edit_prompt_and_negative(list(prompts), sources)  # B rows
        neg, neg_pooled = repeat_groups(neg, group_size), repeat_groups(neg_pooled, group_size)
    return Conditioning(prompt_embeds=repeat_groups(embeds, group_size), pooled=repeat_groups(pooled, group_size),
                        negative_prompt_embeds=neg, negative_pooled=neg_pooled)


def encode_edit_aware(model, prompts: Sequence[str], group_size: int, cfg_scale: float,
                      edit: EditConditioning) -> "Conditioning | MixedConditioning":
    """The B prompts (edit rows per ``edit``, N rows) encoded per kind and repeated G times: a plain Conditioning
    when every prompt is an edit, else a MixedConditioning. Not under no_grad (the text side may train)."""
    if len(edit) != len(prompts) * group_size:
        raise ValueError(f"edit conditioning has {len(edit)} rows for {len(prompts)} prompts x {group_size}")
    is_edit = [bool(edit.source_images[b * group_size]) for b in range(len(prompts))]
    parts = []
    for kind in (False, True):
        chosen = [b for b in range(len(prompts)) if is_edit[b] == kind]
        if not chosen:
            continue
        sources = [edit.source_images[b * group_size] for b in chosen] if kind else None
        rows = [b * group_size + g for b in chosen for g in range(group_size)]
        cond = replace(encode_kind(model, [prompts[b] for b in chosen], sources, group_size, cfg_scale),
                       references=[edit.reference_latents[r] for r in rows] if kind else None)
        parts.append((torch.tensor(rows, dtype=torch.long), cond))
    if len(parts) == 1:
        return parts[0][1]  # every prompt an edit: rows already in order
    return MixedConditioning(tuple(parts), len(prompts) * group_size)

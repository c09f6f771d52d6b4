"""Load a DeepGen ``.pth`` (CHECKPOINT) into a built model: plain weights, LLM LoRA merged, one summary.

Every key of the checkpoint ends in exactly one place of the :class:`LoadSummary` logged after loading:

* loaded  -- copied into the model (``load_state_dict(strict=False)`` after key normalisation);
* merged  -- a peft LoRA factor whose pair was added to its weight: Linear W += (alpha / r) B A, Embedding
  W += (alpha / r) (B A)^T (model/checkpoint_keys.py), r read from the tensors, alpha from
  ``--checkpoint_llm_lora_alpha``;
* skipped -- with the reason: a LoRA tensor we do not merge, a factor without its partner, or a key/LoRA on a
  TIED weight's second name. Qwen2.5-VL-3B ties ``lm_head.weight`` to ``embed_tokens.weight`` (one tensor):
  the embedding's LoRA is merged (the prompt encoder reads it), the lm_head's is not (it would change the
  embeddings too, and it only alters output logits, which image generation never reads);
* unused  -- keys the model does not have.

Every TRAINABLE parameter (outside the LLM, whose weights come from the model path) must be in the checkpoint;
a missing one or a shape mismatch is a :class:`CheckpointError` naming the keys. Works on ``meta`` models too
(shapes are checked, nothing is copied), which the real-size tests use.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..core.model_names import CHECKPOINT_ENV
from .checkpoint_keys import LoraPair, normalize_checkpoint_keys, split_lora, unwrap_state_dict
from .safe_load import UnsafeCheckpointError, load_weights_only

logger = logging.getLogger(__name__)

MERGE_ROWS = 8192  # weight rows merged at once: ~0.07 GB of fp32 delta at width 2048
SHAPE_FLAGS = "--num_queries, --num_fusion_layers and the --connector_* flags"
TIED_LORA_REASON = ("LoRA on {alias}, which is tied to {owner} (one tensor): merging it would change the input "
                    "embeddings; it only alters output logits, which image generation never reads")
TIED_KEY_REASON = "{alias} is tied to {owner} (one tensor): that tensor is set through {owner} only"


class CheckpointError(ValueError):
    """CHECKPOINT does not fit the model (missing trainable keys, wrong shapes)."""


@dataclass
class LoadSummary:
    """Where each checkpoint key went (names after prefix stripping and Qwen layout normalisation)."""

    source: str
    total_keys: int
    loaded: list[str] = field(default_factory=list)
    merged: Counter = field(default_factory=Counter)  # module kind (linear / embedding) -> LoRA pairs merged
    merged_keys: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why
    unused: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (from the paths)

    def accounted_keys(self) -> set[str]:
        return set(self.loaded) | set(self.merged_keys) | set(self.skipped) | set(self.unused)

    def describe(self) -> str:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.merged.items())) or "none"
        lines = [f"{self.source}: {self.total_keys} keys -> {len(self.loaded)} loaded, "
                 f"{sum(self.merged.values())} LoRA pairs merged ({kinds}; {len(self.merged_keys)} keys), "
                 f"{len(self.skipped)} skipped, {len(self.unused)} unused"]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(key)
        lines += [f"  skipped ({reason}): {', '.join(sorted(keys))}" for reason, keys in by_reason.items()]
        if self.unused:
            lines.append(f"  unused (not in the model): {', '.join(sorted(self.unused))}")
        return "\n".join(lines)


def tied_parameter_owners(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter registered under several names -> the name it is set through.

    The owner is the name on an ``nn.Embedding`` (the input embeddings the prompt encoder reads) when one is
    in the group, else the name ``named_parameters()`` lists.
    """
    groups: dict[int, list[tuple[str, bool]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            group = groups.setdefault(id(param), [])
            if name not in (n for n, _ in group):
                group.append((name, isinstance(module, nn.Embedding)))
    owners = {}
    for group in groups.values():
        if len(group) > 1:
            owner = next((name for name, is_embedding in group if is_embedding), group[0][0])
            owners.update({name: owner for name, _ in group})
    return owners


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (flat, ``{"state_dict": ...}`` or ``{"module": ...}``), keys normalised.

    Weights-only (model/safe_load.py): a file that would run code is refused (:class:`UnsafeCheckpointError`); a
    truncated or non-torch file is a :class:`CheckpointError`; both name the file and CHECKPOINT."""
    source = f"{CHECKPOINT_ENV} (--checkpoint)"
    try:
        raw = load_weights_only(path, source=source)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated / not a torch file: name the file and where it came from
        raise CheckpointError(f"{source} = {str(path)!r} could not be read: {type(err).__name__}: {err}") from err
    return normalize_checkpoint_keys(unwrap_state_dict(raw))


def load_checkpoint_into(model: nn.Module, path: str | Path, trainable_modules: str = "dit",
                         llm_lora_alpha: float = 128.0) -> LoadSummary:
    """Load a DeepGen ``.pth`` with ``strict=False``, merge its LLM LoRA, log and return the summary."""
    summary = load_state_into(model, read_checkpoint(path), str(path), trainable_modules, llm_lora_alpha)
    noteworthy = summary.skipped or summary.unused
    logger.log(logging.WARNING if noteworthy else logging.INFO, "%s", summary.describe())
    return summary


def load_state_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                    trainable_modules: str = "dit", llm_lora_alpha: float = 128.0,
                    dit_lora_alpha: Optional[float] = None) -> LoadSummary:
    """:func:`load_checkpoint_into` on an already normalised state dict (``source`` names it in messages).

    ``dit_lora_alpha``: the --lora_alpha of the --use_lora run whose DiT LoRA factors ``state_dict`` holds (read
    from that run's checkpoint by the caller); they are merged at that scale and stand for the DiT weights the run
    trained through them. Without it such factors are refused: the file alone does not say their scale."""
    split = split_lora(state_dict)
    dit_lora = [pair for pair in split.pairs if pair.target.startswith("transformer.")]
    if dit_lora and dit_lora_alpha is None:
        raise CheckpointError(f"{source} holds DiT LoRA factors ({dit_lora[0].keys[0]}, ...), whose scale (the "
                              "training run's --lora_alpha / --lora_rank) this file does not carry: export the RL "
                              "checkpoint with scripts/utils/rlckpt_to_sftckpt.py, which merges them at the run's own "
                              "scale")
    summary = LoadSummary(source=source, total_keys=len(state_dict), skipped=dict(split.skipped))
    owners = tied_parameter_owners(model)
    plain = {}
    for key, value in split.plain.items():
        if owners.get(key, key) != key:
            summary.skipped[split.origins[key]] = TIED_KEY_REASON.format(alias=key, owner=owners[key])
        else:
            plain[key] = value
    _check_shapes(model, plain, source)
    _check_trainable_present(model, plain, source, trainable_modules, dit_by_lora=bool(dit_lora))
    result = model.load_state_dict(plain, strict=False)
    unexpected = set(result.unexpected_keys)
    summary.unused = [split.origins[key] for key in plain if key in unexpected]
    summary.loaded = [split.origins[key] for key in plain if key not in unexpected]
    summary.missing_keys = list(result.missing_keys)
    _merge_lora_pairs(model, [p for p in split.pairs if not p.target.startswith("transformer.")], owners,
                      llm_lora_alpha, summary)
    if dit_lora:
        _merge_lora_pairs(model, dit_lora, owners, dit_lora_alpha, summary)
    assert summary.accounted_keys() == set(state_dict), "a checkpoint key is missing from the load summary"
    frozen_gaps = [k for k in result.missing_keys if not k.startswith(("lmm.", "vae.")) and owners.get(k, k) == k]
    if frozen_gaps:
        logger.warning("%s has no value for %d frozen parameter(s), which keep the values they had before this "
                       "load (their initialisation, or an earlier checkpoint's), e.g. %s", source, len(frozen_gaps),
                       frozen_gaps[:5])
    return summary


def _check_shapes(model: nn.Module, plain: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in plain.items() if k in own and v.shape != own[k].shape]
    if wrong:
        more = f"\n  ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""
        raise CheckpointError(f"{source} does not fit the model (check {SHAPE_FLAGS}):\n  "
                              + "\n  ".join(wrong[:20]) + more)


def _check_trainable_present(model: nn.Module, plain: Mapping[str, torch.Tensor], source: str,
                             trainable_modules: str, dit_by_lora: bool = False) -> None:
    # Exactly what training updates (set_trainable leaves out the parts no gradient reaches); LLM weights come
    # from the model path, so they are never demanded from the checkpoint, nor DiT weights a LoRA run trained
    # through its factors (``dit_by_lora``).
    model.set_trainable(trainable_modules)
    skip = ("lmm.", "transformer.") if dit_by_lora else ("lmm.",)
    required = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith(skip)]
    model.requires_grad_(False)
    missing = [k for k in required if k not in plain]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} parameter(s) that --trainable_modules "
                              f"{trainable_modules} trains:\n  " + "\n  ".join(missing))


def _merge_lora_pairs(model: nn.Module, pairs: list[LoraPair], owners: Mapping[str, str], lora_alpha: float,
                      summary: LoadSummary) -> None:
    """W += delta for each pair, one row block at a time (all deltas of a 3B LLM at once would be ~12 GB fp32)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for pair in pairs:
            if pair.target not in params:
                raise CheckpointError(f"{summary.source} has a LoRA for {pair.target!r} ({pair.keys[0]}), which the "
                                      "model does not have: is CHECKPOINT made for this Qwen2.5-VL model?")
            if owners.get(pair.target, pair.target) != pair.target:
                reason = TIED_LORA_REASON.format(alias=pair.target, owner=owners[pair.target])
                summary.skipped.update({key: reason for key in pair.keys})
                continue
            param = params[pair.target]
            if tuple(pair.target_shape) != tuple(param.shape):
                raise CheckpointError(f"{summary.source}: the LoRA of {pair.target!r} gives a delta of shape "
                                      f"{tuple(pair.target_shape)}, the weight is {tuple(param.shape)}")
            for start in range(0, param.shape[0], MERGE_ROWS):  # add in fp32, round once, a row block at a time
                rows = slice(start, start + MERGE_ROWS)
                param[rows] = (param[rows].float() + pair.delta_rows(rows, lora_alpha, param.device)).to(param.dtype)
            summary.merged[pair.kind] += 1
            summary.merged_keys.extend(pair.keys)

"""Key names of DeepGen checkpoints: normalise what real files contain, and write the reference layout.

Real ``.pth`` files vary (docs/upstream_compatibility.md#checkpoints):
* wrappers add leading ``module.`` (DeepSpeed/DDP) or ``model.`` prefixes;
* Qwen2.5-VL keys moved between transformers versions. The reference (older transformers) writes
  ``lmm.visual.*`` and ``lmm.model.*``; current transformers names them ``lmm.model.visual.*`` and
  ``lmm.model.language_model.*``. We read both and write the reference layout.
* the pretraining checkpoint may carry a peft LoRA on the LLM (the reference's ``lora_modules='auto'``: EVERY
  ``nn.Linear`` and ``nn.Embedding``): ``...q_proj.lora_A[.default].weight`` [r, in] / ``lora_B`` [out, r],
  ``...embed_tokens.lora_embedding_A[.default]`` [r, num_embeddings] / ``lora_embedding_B`` [dim, r], and the
  wrapped ``...base_layer.weight``. :func:`split_lora` pairs the factors; the loader adds each delta
  (alpha / r) B A (an Embedding's: its transpose) onto the weight it belongs to.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

TOP_LEVEL_NAMES = ("lmm", "transformer", "vae", "connector", "projector_1", "projector_2", "projector_3",
                   "meta_queries", "ema")
WRAPPER_PREFIXES = ("module.", "model.")
# Keys the SFT .pth never carries: they come from the model paths (and EMA is not trained by RL).
OMITTED_PREFIXES = ("vae.", "lmm.", "ema.")

# peft's factor names: Linear ``<module>.lora_A[.<adapter>].weight``; Embedding
# ``<module>.lora_embedding_A[.<adapter>]`` (a ParameterDict entry, hence no ``.weight``). The adapter name is
# absent in peft's own saved adapters; it is never ``weight``/``bias`` (those are the suffix).
_LORA_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?P<suffix>\.weight|\.bias)?$")
_FACTOR_KIND = {"lora_A": "linear", "lora_B": "linear",
                "lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a loaded checkpoint (``{"state_dict": ...}``, ``{"module": ...}`` or flat)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "module", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError("checkpoint holds no tensors: expected a state dict, {'state_dict': ...} or {'module': ...}")


def strip_wrapper_prefixes(key: str) -> str:
    """``module.model.transformer.x`` -> ``transformer.x``; ``lmm.model.*`` (inside Qwen) is left alone."""
    while key.startswith(WRAPPER_PREFIXES) and not key.startswith(tuple(f"{n}." for n in TOP_LEVEL_NAMES)):
        key = key.split(".", 1)[1]
    return key


def qwen_key_to_current(key: str) -> str:
    """Reference Qwen2.5-VL layout -> current transformers layout (idempotent)."""
    if key.startswith("lmm.visual."):
        return "lmm.model.visual." + key[len("lmm.visual."):]
    if key.startswith("lmm.model.") and not key.startswith(("lmm.model.visual.", "lmm.model.language_model.")):
        return "lmm.model.language_model." + key[len("lmm.model."):]
    return key


def qwen_key_to_reference(key: str) -> str:
    """Current transformers Qwen2.5-VL layout -> the reference layout (idempotent)."""
    if key.startswith("lmm.model.visual."):
        return "lmm.visual." + key[len("lmm.model.visual."):]
    if key.startswith("lmm.model.language_model."):
        return "lmm.model." + key[len("lmm.model.language_model."):]
    return key


def normalize_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and move Qwen keys to the current transformers layout."""
    normalized: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = qwen_key_to_current(strip_wrapper_prefixes(key))
        if new_key in normalized:
            raise ValueError(f"checkpoint has two keys that both mean {new_key!r} (one of them is {key!r})")
        normalized[new_key] = value
    return normalized


def to_reference_keys(state_dict: Mapping[str, torch.Tensor], include_lmm: bool = False) -> dict[str, torch.Tensor]:
    """Model state dict -> the SFT ``.pth`` layout: reference key names, no ``vae.``/``ema.``, ``lmm.`` only if asked."""
    omitted = tuple(p for p in OMITTED_PREFIXES if not (include_lmm and p == "lmm."))
    return {qwen_key_to_reference(k): v for k, v in state_dict.items() if not k.startswith(omitted)}




@dataclass(frozen=True)
class LoraPair:
    """One peft LoRA on the weight ``target`` (a model state-dict key): ``a`` [r, in] and ``b`` [out, r].

    ``kind`` is ``linear`` (delta = (alpha / r) B A, shaped like the Linear weight [out, in]) or ``embedding``
    (peft's layout: A [r, num_embeddings], B [embedding_dim, r]; delta = (alpha / r) (B A)^T, shaped like the
    Embedding weight [num_embeddings, embedding_dim]). r is read from the tensors.
    """

    target: str
    kind: str
    a: torch.Tensor
    b: torch.Tensor
    keys: tuple[str, str]  # the checkpoint keys of A and B (for the load summary)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def target_shape(self) -> tuple[int, int]:
        """Shape of the weight the delta is added to: Linear [out, in], Embedding [num_embeddings, dim]."""
        if self.kind == "embedding":
            return self.a.shape[1], self.b.shape[0]
        return self.b.shape[0], self.a.shape[1]

    def delta_rows(self, rows: slice, lora_alpha: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``rows`` (of the weight's first dimension) of the fp32 delta, on ``device`` (``meta``: shape only).

        Row blocks keep the working set small: a whole embedding delta of Qwen2.5-VL-3B is 1.2 GB in fp32.
        """
        a, b = self.a.to(device, torch.float32), self.b.to(device, torch.float32)
        if self.kind == "embedding":
            part = a[:, rows].T @ b.T  # rows of (B A)^T: [rows, dim]
        else:
            part = b[rows] @ a  # rows of B A: [rows, in]
        return part * (lora_alpha / self.rank)

    def delta(self, lora_alpha: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole fp32 delta, shaped like the target weight."""
        return self.delta_rows(slice(None), lora_alpha, device)


@dataclass
class LoraSplit:
    """A checkpoint split into plain weights, LoRA pairs and the ``.lora_`` keys that are not pairs we merge.

    plain: state dict without LoRA keys, ``base_layer.`` removed from names (``origins``: plain name -> its
    checkpoint key); pairs: one per wrapped module; skipped: checkpoint key -> why it is not used (every key
    lands in exactly one of the three).
    """

    plain: dict[str, torch.Tensor]
    origins: dict[str, str] = field(default_factory=dict)
    pairs: list[LoraPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def split_lora(state_dict: Mapping[str, torch.Tensor]) -> LoraSplit:
    """Pair the peft LoRA factors of a (normalised) checkpoint; never drops a key without a reason."""
    plain: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    factors: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    skipped: dict[str, str] = {}
    for key, value in state_dict.items():
        match = _LORA_FACTOR.match(key)
        if match and match["suffix"] != ".bias":
            kind = _FACTOR_KIND[match["factor"]]
            slot = factors.setdefault((match["module"], kind, match["adapter"] or ""), {})
            slot[match["factor"][-1]] = (key, value)  # "A" or "B"
        elif ".lora_" in key:
            skipped[key] = "a LoRA tensor that is not an A/B factor (bias, dropout, DoRA magnitude): not merged"
        else:
            name = key.replace(".base_layer.", ".")
            if name in plain:
                raise ValueError(f"checkpoint has both {key!r} and a plain key that also means {name!r}")
            plain[name] = value
            origins[name] = key
    pairs = []
    for (module, kind, _), slot in factors.items():
        if set(slot) != {"A", "B"}:
            (key, _tensor), = slot.values()
            skipped[key] = f"its LoRA partner ({'B' if 'A' in slot else 'A'}) is not in the checkpoint"
            continue
        (key_a, a), (key_b, b) = slot["A"], slot["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA factors {key_a!r} {tuple(a.shape)} and {key_b!r} {tuple(b.shape)} do not "
                             "share a rank (expected A [r, in], B [out, r])")
        pairs.append(LoraPair(target=f"{module}.weight", kind=kind, a=a, b=b, keys=(key_a, key_b)))
    targets = Counter(pair.target for pair in pairs)
    doubled = [target for target, count in targets.items() if count > 1]
    if doubled:
        raise ValueError(f"checkpoint has several LoRA adapters on {doubled[:3]}: keep one adapter per module")
    return LoraSplit(plain=plain, origins=origins, pairs=pairs, skipped=skipped)

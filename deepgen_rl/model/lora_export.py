"""The DiT LoRA of a ``--use_lora`` run, exported: merged into the DiT weights, or as a peft adapter folder.

A LoRA run's checkpoint holds the adapter factors (``transformer.<module>.lora_A.default.weight`` [r, in] and
``lora_B`` [out, r]), never the frozen DiT weights they sit on, and the factors alone say nothing of the scale the
run applied: peft adds (lora_alpha / r) B A x. The run's ``lora_alpha`` / ``lora_rank`` / target modules and the
model paths it started from are read from the checkpoint's run config (``trainer_state.json``, written by
``trainer/run_checkpoints.run_config``).

* merged (default): the base DiT (``SD3_5_MODEL_NAME_OR_PATH``'s transformer, CHECKPOINT's ``transformer.*`` on top,
  as training loaded it) gets the adapter through peft itself (``inject_adapter_in_model``,
  ``set_peft_model_state_dict``, each layer's ``merge``), so ``W + (alpha / r) B A`` is peft's arithmetic. EVERY
  ``transformer.*`` weight is written: the file then loads like a full-DiT run's export, through
  ``load_state_dict(strict=False)`` and through our CHECKPOINT loader (which needs every DiT weight).
* ``--keep_lora``: ``adapter_config.json`` + ``adapter_model.safetensors`` in a folder, as peft's
  ``save_pretrained`` writes them (keys ``base_model.model.<module>.lora_A.weight``), for
  ``PeftModel.from_pretrained(model.transformer, folder)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from .checkpoint_keys import LoraPair, split_lora

DIT_PREFIX = "transformer."
RUN_STATE_FILE = "trainer_state.json"  # trainer/checkpointing.py TRAINER_STATE_NAME (model/ must not import trainer/)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's save_pretrained puts before a module name


@dataclass(frozen=True)
class DitLora:
    """The run's DiT adapter: its factor pairs (targets ``transformer.<module>.weight``), rank, alpha, modules."""

    pairs: list[LoraPair]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> list[str]:
        """The wrapped modules' names inside the DiT (``transformer_blocks.0.attn.to_q``)."""
        return [pair.target[len(DIT_PREFIX):-len(".weight")] for pair in self.pairs]


def read_run_config(rl_checkpoint: str | Path) -> dict:
    """The run config saved in ``checkpoint-N/trainer_state.json`` ({} for a state-dict file or an older run)."""
    path = Path(rl_checkpoint)
    state_file = path / RUN_STATE_FILE if path.is_dir() else None
    if state_file is None or not state_file.is_file():
        return {}
    try:
        return dict(json.loads(state_file.read_text()).get("run_config") or {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"--rl_checkpoint: {state_file} is not the trainer's JSON ({err})") from None


def split_dit_lora(state: Mapping[str, torch.Tensor]) -> tuple[list[LoraPair], dict[str, torch.Tensor]]:
    """(the DiT's LoRA pairs, every other tensor) of a normalised checkpoint state."""
    dit = {k: v for k, v in state.items() if k.startswith(DIT_PREFIX) and ".lora_" in k}
    split = split_lora(dit)
    if split.skipped:
        raise ValueError(f"DiT LoRA tensors that are not A/B pairs: {dict(list(split.skipped.items())[:3])}")
    return split.pairs, {k: v for k, v in state.items() if k not in dit}


def dit_lora_settings(pairs: list[LoraPair], run_config: Mapping, lora_alpha: Optional[float]) -> DitLora:
    """Rank, alpha and target modules of the run (``lora_alpha``: the converter's flag, for a checkpoint without a
    run config); the rank is checked against the factors' shapes."""
    ranks = {pair.rank for pair in pairs}
    if len(ranks) != 1:
        raise ValueError(f"the DiT LoRA factors have several ranks {sorted(ranks)}: not one --use_lora adapter")
    rank = ranks.pop()
    saved_alpha = run_config.get("lora_alpha")
    if saved_alpha is None and lora_alpha is None:
        raise ValueError("this checkpoint holds DiT LoRA factors but no run config with the run's --lora_alpha "
                         f"(a checkpoint-N folder's {RUN_STATE_FILE} records it; older runs did not): pass the "
                         "training run's value as --lora_alpha")
    if saved_alpha is not None and lora_alpha is not None and float(lora_alpha) != float(saved_alpha):
        raise ValueError(f"--lora_alpha {lora_alpha} differs from the run's own --lora_alpha {saved_alpha} "
                         f"({RUN_STATE_FILE}): leave the flag out to use the run's")
    saved_rank = run_config.get("lora_rank")
    if saved_rank is not None and int(saved_rank) != rank:
        raise ValueError(f"the LoRA factors have rank {rank} but the run config says --lora_rank {saved_rank}")
    targets = run_config.get("lora_target_modules")
    # Without the run's names (e.g. to_out.0), the wrapped modules' full names: peft matches them exactly.
    modules = tuple(targets.split(",")) if targets else tuple(p.target[len(DIT_PREFIX):-len(".weight")] for p in pairs)
    return DitLora(pairs=pairs, rank=rank, alpha=float(saved_alpha if saved_alpha is not None else lora_alpha),
                   target_modules=modules)


def _peft_config(lora: DitLora, exact: bool = False):
    """peft's LoraConfig of the run; ``exact``: on exactly the modules the checkpoint has factors for."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                      target_modules=lora.modules() if exact else list(lora.target_modules))


def _factors(lora: DitLora, prefix: str = "") -> dict[str, torch.Tensor]:
    """peft's saved-adapter names (no adapter name): ``<prefix><module>.lora_A.weight`` / ``lora_B.weight``."""
    out = {}
    for module, pair in zip(lora.modules(), lora.pairs):
        out[f"{prefix}{module}.lora_A.weight"] = pair.a.float().contiguous()
        out[f"{prefix}{module}.lora_B.weight"] = pair.b.float().contiguous()
    return out


def load_base_dit(sd3_path: str, checkpoint: str) -> torch.nn.Module:
    """The DiT as the run loaded it before adding the adapter: the diffusers transformer of ``sd3_path`` with
    CHECKPOINT's ``transformer.*`` weights on top, in float32."""
    from .kontext import SD3Transformer2DKontextModel
    from .loading import check_checkpoint_path, check_sd3_path

    transformer = SD3Transformer2DKontextModel.from_pretrained(check_sd3_path(sd3_path), subfolder="transformer",
                                                               torch_dtype=torch.float32)
    if checkpoint:
        from .checkpoint_loading import read_checkpoint

        state = read_checkpoint(check_checkpoint_path(checkpoint))
        dit = {k[len(DIT_PREFIX):]: v for k, v in split_lora(state).plain.items() if k.startswith(DIT_PREFIX)}
        result = transformer.load_state_dict(dit, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"CHECKPOINT {checkpoint} has DiT keys the model lacks: {result.unexpected_keys[:5]}")
    return transformer


def merged_dit_state(lora: DitLora, sd3_path: str, checkpoint: str) -> dict[str, torch.Tensor]:
    """Every ``transformer.*`` tensor of the base DiT with the adapter merged by peft: W + (alpha / r) B A."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    transformer = inject_adapter_in_model(_peft_config(lora, exact=True), load_base_dit(sd3_path, checkpoint))
    result = set_peft_model_state_dict(transformer, _factors(lora))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA factors for modules the DiT lacks: {result.unexpected_keys[:5]}")
    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)  # safe: refuses a merge that would make the weight non-finite
    return {DIT_PREFIX + k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items()
            if ".lora_" not in k}


def write_peft_adapter(lora: DitLora, folder: Path, dtype: torch.dtype, base_model: str = "") -> list[Path]:
    """``folder/adapter_config.json`` and ``folder/adapter_model.safetensors`` as peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = _peft_config(lora)
    config.base_model_name_or_path = base_model or None
    config.save_pretrained(str(folder))
    weights = {k: v.to(dtype).contiguous() for k, v in _factors(lora, PEFT_PREFIX).items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return [folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS]

"""RL checkpoint -> SFT ``.pth``: what ``scripts/utils/rlckpt_to_sftckpt.py`` does.

An RL ``checkpoint-N`` folder is a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3 shards, a ``latest`` file, frozen
parameters excluded) or, for runs without DeepSpeed, a plain state dict (``model.safetensors``,
``pytorch_model.bin``, ``*.pth``). The output is a flat ``{key: tensor}`` ``.pth`` with the DeepGen reference
key names, which ``xtuner``'s ``guess_load_checkpoint`` + ``load_state_dict(strict=False)`` (and our own
``load_checkpoint_into``) read. It holds what RL trained; it is meant to be loaded ON TOP of the pretraining
checkpoint, which still provides everything else (connector when frozen, LLM LoRA, ...).

``weights="ema"`` exports the fp32 EMA of the trained parameters that a run with --ema_decay saved beside the
DeepSpeed files (``checkpoint-N/ema.pt``) instead of the raw (live) weights.

A ``--use_lora`` run's DiT adapter is merged into the DiT weights at the run's own alpha / rank (``lora_export.py``:
the ``.pth`` then holds every ``transformer.*`` weight, as a full-DiT run's does), or with ``keep_lora`` written as
a peft adapter folder (``output`` is then that folder).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint_keys import normalize_checkpoint_keys, to_reference_keys, unwrap_state_dict
from .lora_export import (ADAPTER_CONFIG, DIT_PREFIX, DitLora, dit_lora_settings, merged_dit_state, read_run_config,
                          split_dit_lora, write_peft_adapter)
from .safe_load import UnsafeCheckpointError, load_weights_only, weights_only_loads

SOURCE = "--rl_checkpoint"

PLAIN_STATE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = ("raw", "ema")
EMA_FILE = "ema.pt"  # trainer/checkpointing.py EMA_STATE_NAME


@dataclass(frozen=True)
class ConversionSummary:
    output: Path
    source_format: str
    num_tensors: int
    num_parameters: int
    prefix_counts: dict[str, int]
    includes_lmm: bool
    weights: str = "raw"
    has_ema: bool = False
    lora: str = ""  # what was done with a DiT LoRA ("" without one)
    adapter_folder: bool = False  # --keep_lora: ``output`` is a peft adapter folder, not a .pth

    def describe(self) -> str:
        prefixes = ", ".join(f"{name}: {count}" for name, count in sorted(self.prefix_counts.items()))
        return (
            f"wrote {self.output} ({self.num_tensors} tensors, {self.num_parameters / 1e6:.2f}M parameters; "
            f"read as {self.source_format}; {self.weights} weights)\n  keys by module: {prefixes}\n"
            + (f"  {self.lora}\n" if self.lora else "")
            + ("  this checkpoint also holds the EMA of the weights: --weights ema exports it\n"
               if self.has_ema and self.weights == "raw" else "")
            + ("  includes lmm.* weights (the LLM was trained)\n" if self.includes_lmm else "")
            + ("" if not self.adapter_folder else "  Load the base model (pretraining checkpoint), then the adapter.")
            + ("" if self.adapter_folder else
               "  Load it ON TOP of the pretraining checkpoint (CHECKPOINT): it holds only what RL trained, e.g.\n"
            "    model.load_state_dict(guess_load_checkpoint(pretrain_pth), strict=False)\n"
            f"    model.load_state_dict(guess_load_checkpoint('{self.output}'), strict=False)")
        )


def read_rl_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read the trained weights of an RL checkpoint folder (or a state-dict file); returns (state, format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--rl_checkpoint {str(path)!r} does not exist: expected a checkpoint-N folder "
                                "written by the trainer (DeepSpeed ZeRO-2/3) or a state-dict file.")
    if path.is_file():
        return _read_state_file(path), f"state-dict file {path.name}"
    if (path / "latest").is_file() or any(path.glob("global_step*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else _newest_tag(path)
        # DeepSpeed's reader asks torch for full unpickling; weights_only_loads forces weights-only loads.
        try:
            with weights_only_loads(path, source=SOURCE):
                state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=True)
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated shard, missing file, ... : name the folder, keep DeepSpeed's reason
            raise ValueError(f"{SOURCE} {str(path)!r}: DeepSpeed checkpoint (tag {tag}) could not be read: "
                             f"{type(err).__name__}: {err}") from err
        return dict(state), f"DeepSpeed checkpoint (tag {tag})"
    for name in PLAIN_STATE_FILES:
        if (path / name).is_file():
            return _read_state_file(path / name), f"state-dict file {name}"
    raise FileNotFoundError(
        f"--rl_checkpoint {str(path)!r} holds neither a DeepSpeed checkpoint (a 'latest' file or global_step*/) "
        f"nor one of {', '.join(PLAIN_STATE_FILES)}."
    )


def _newest_tag(folder: Path) -> str:
    steps = sorted(folder.glob("global_step*"), key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0))
    return steps[-1].name


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return unwrap_state_dict(load_weights_only(path, source=SOURCE))
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"{SOURCE}: {path} could not be read: {type(err).__name__}: {err}") from err


def read_ema_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint-N folder (its ema.pt, read weights-only): {state-dict name: fp32 tensor}."""
    path = Path(path)
    file = path / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"--weights ema: {file} does not exist: the run was trained without --ema_decay "
                                "(or this is not a checkpoint-N folder). Export the live weights with --weights raw.")
    try:
        state = load_weights_only(file, source=SOURCE)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"{SOURCE}: {file} could not be read: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("shadow"), dict):
        raise ValueError(f"{SOURCE}: {file} holds no EMA ('shadow' missing): not written by the GRPO trainer.")
    return dict(state["shadow"])


def convert_rl_checkpoint(rl_checkpoint: str | Path, output: str | Path, dtype: str = "float32",
                          weights: str = "raw", *, keep_lora: bool = False, sd3_model_name_or_path: str = "",
                          checkpoint: Optional[str] = None, lora_alpha: Optional[float] = None) -> ConversionSummary:
    """Write the SFT-format ``.pth`` of ``rl_checkpoint`` to ``output`` (parent folders created); ``weights``:
    ``raw`` (the trained weights) or ``ema`` (their EMA, from ``ema.pt``). A DiT LoRA is merged into the DiT
    (base paths ``sd3_model_name_or_path`` / ``checkpoint``, default: the run's own), or with ``keep_lora`` written
    as a peft adapter folder at ``output``; ``lora_alpha`` only for a checkpoint that does not record its run's."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}; got {weights!r}.")
    if weights == "ema":
        raw, source_format = read_ema_weights(rl_checkpoint), f"EMA file {EMA_FILE}"
    else:
        raw, source_format = read_rl_checkpoint(rl_checkpoint)
    state = normalize_checkpoint_keys(raw)
    pairs, rest = split_dit_lora(state)
    lora_note, output = "", Path(output)
    if pairs:
        run_config = read_run_config(rl_checkpoint)
        lora = dit_lora_settings(pairs, run_config, lora_alpha)
        if keep_lora:
            return _write_adapter(lora, rest, output, dtype, weights, source_format, rl_checkpoint,
                                  sd3_model_name_or_path or run_config.get("sd3_model_name_or_path", ""))
        state = {**{k: v for k, v in rest.items() if not k.startswith(DIT_PREFIX)},
                 **_merge(lora, run_config, sd3_model_name_or_path, checkpoint)}
        lora_note = (f"DiT LoRA (rank {lora.rank}, alpha {lora.alpha:g}: scale {lora.scale:g}) merged into "
                     f"{len(pairs)} DiT weights; every transformer.* weight is written (--keep_lora: peft adapter)")
    elif keep_lora:
        raise ValueError(f"--keep_lora: {rl_checkpoint} holds no DiT LoRA (the run was trained without --use_lora)")
    includes_lmm = any(k.startswith("lmm.") for k in state)
    sft_state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_reference_keys(state, include_lmm=includes_lmm).items()}
    if not sft_state:
        raise ValueError(f"{rl_checkpoint} holds no DeepGen weights to convert (keys seen: {list(state)[:5]})")
    _save_atomically(sft_state, output)
    return ConversionSummary(
        output=output,
        source_format=source_format,
        num_tensors=len(sft_state),
        num_parameters=sum(t.numel() for t in sft_state.values()),
        prefix_counts=dict(Counter(k.split(".", 1)[0] for k in sft_state)),
        includes_lmm=includes_lmm,
        weights=weights,
        has_ema=_has_ema(rl_checkpoint),
        lora=lora_note,
    )


def load_rl_checkpoint_into(model: torch.nn.Module, rl_checkpoint: str | Path, weights: str = "raw",
                            trainable_modules: str = "dit"):
    """Layer an RL checkpoint on ``model`` (already holding the pretraining CHECKPOINT), as the converter's
    output is meant to be used: a checkpoint-N folder (DeepSpeed or plain; ``weights`` raw or its ``ema.pt``) or a
    ``.pth`` written by :func:`convert_rl_checkpoint`. Every trained tensor must fit the model (shapes and the
    parameters ``trainable_modules`` trains are checked). Returns the load summary."""
    from .checkpoint_loading import load_state_into

    if weights not in WEIGHTS:
        raise ValueError(f"--rl_weights must be one of {', '.join(WEIGHTS)}; got {weights!r}.")
    if weights == "ema":
        raw = read_ema_weights(rl_checkpoint)
    else:
        raw, _ = read_rl_checkpoint(rl_checkpoint)
    state = normalize_checkpoint_keys(raw)
    # A --use_lora run's checkpoint holds the DiT's LoRA factors: merged at the run's own scale (its run config).
    pairs, _ = split_dit_lora(state)
    alpha = dit_lora_settings(pairs, read_run_config(rl_checkpoint), None).alpha if pairs else None
    summary = load_state_into(model, state, f"--rl_checkpoint {rl_checkpoint}", trainable_modules,
                              dit_lora_alpha=alpha)
    if not summary.loaded and not summary.merged_keys:
        raise ValueError(f"--rl_checkpoint {rl_checkpoint}: none of its {len(state)} tensors is a parameter of this "
                         f"model (keys seen: {list(state)[:5]}).")
    return summary


def _has_ema(rl_checkpoint: str | Path) -> bool:
    return Path(rl_checkpoint).is_dir() and (Path(rl_checkpoint) / EMA_FILE).is_file()


def _save_atomically(state: dict[str, torch.Tensor], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(output)  # never leave a half-written .pth behind


def _merge(lora: DitLora, run_config: dict, sd3_model_name_or_path: str,
           checkpoint: Optional[str]) -> dict[str, torch.Tensor]:
    """The merged DiT, on the base the run started from (its config's paths unless the flags name others)."""
    sd3 = sd3_model_name_or_path or run_config.get("sd3_model_name_or_path") or ""
    base_checkpoint = checkpoint if checkpoint is not None else (run_config.get("checkpoint") or "")
    if not sd3:
        raise ValueError("merging the DiT LoRA needs the DiT it was trained on, and this checkpoint's run config "
                         "names none: pass the run's --sd3_model_name_or_path (and --checkpoint), or --keep_lora")
    try:
        return merged_dit_state(lora, sd3, base_checkpoint)
    except FileNotFoundError as err:  # the run's model paths are not on this machine
        raise FileNotFoundError(f"the base DiT of this LoRA run cannot be read ({err}); pass "
                                "--sd3_model_name_or_path / --checkpoint where they are here") from None


def _write_adapter(lora: DitLora, rest: dict[str, torch.Tensor], output: Path, dtype: str, weights: str,
                   source_format: str, rl_checkpoint: str | Path, base_model: str) -> ConversionSummary:
    """--keep_lora: the peft adapter folder, plus ``rl_weights.pth`` for what else the run trained (connector...)."""
    if output.suffix in (".pth", ".pt", ".bin", ".safetensors") or output.is_file():
        raise ValueError(f"--keep_lora writes a folder ({ADAPTER_CONFIG} + adapter weights); --output {output} "
                         "looks like a file name")
    write_peft_adapter(lora, output, DTYPES[dtype], base_model)
    # The DiT's buffers (pos_embed) come with the base model; other trained modules are not part of the adapter.
    others = to_reference_keys({k: v for k, v in rest.items() if not k.startswith(DIT_PREFIX)},
                               include_lmm=any(k.startswith("lmm.") for k in rest))
    if others:
        _save_atomically({k: v.to(DTYPES[dtype]).contiguous() for k, v in others.items()}, output / "rl_weights.pth")
    tensors = 2 * len(lora.pairs) + len(others)
    return ConversionSummary(
        output=output, source_format=source_format, num_tensors=tensors,
        num_parameters=sum(p.a.numel() + p.b.numel() for p in lora.pairs) + sum(v.numel() for v in others.values()),
        prefix_counts=dict(Counter(["transformer"] * 2 * len(lora.pairs) + [k.split(".", 1)[0] for k in others])),
        includes_lmm=any(k.startswith("lmm.") for k in others), weights=weights, has_ema=_has_ema(rl_checkpoint),
        adapter_folder=True,
        lora=(f"DiT LoRA (rank {lora.rank}, alpha {lora.alpha:g}) written as a peft adapter: load it with "
              f"PeftModel.from_pretrained(model.transformer, '{output}')"
              + ("; the other trained weights are in rl_weights.pth" if others else "")))

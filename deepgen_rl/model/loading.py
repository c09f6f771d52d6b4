"""Build a :class:`DeepGenModel` from local model folders and a DeepGen ``.pth`` checkpoint.

1. ``SD3_5_MODEL_NAME_OR_PATH``: a diffusers folder with ``transformer/``, ``vae/`` and ``scheduler/``.
2. ``QWEN2_5_VL_MODEL_NAME_OR_PATH``: a transformers folder with the Qwen2.5-VL config, weights, tokenizer.
3. ``CHECKPOINT`` (optional): the DeepGen_Image ``.pth`` (connector, projectors, meta queries, DiT, ...),
   loaded with ``strict=False`` after key normalisation; every TRAINABLE parameter must be in it.

Tiny test models (``model/tiny.py``) are saved in the same layouts and loaded through this same code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from ..config import CHECKPOINT_ENV, QWEN_ENV, SD3_ENV, ModelArguments
from .checkpoint_keys import merge_lora_weights, normalize_checkpoint_keys, unwrap_state_dict
from .connector import ConnectorConfig
from .deepgen import DeepGenModel
from .safe_load import UnsafeCheckpointError, load_weights_only

logger = logging.getLogger(__name__)

SD3_LAYOUT = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


class ModelPathError(FileNotFoundError):
    """A model path is unset or does not hold what it should; the message names the env variable."""


class CheckpointError(ValueError):
    """CHECKPOINT does not fit the model (missing trainable keys, wrong shapes)."""


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_sd3_path(path: str) -> Path:
    folder = _require_dir(path, SD3_ENV, "--sd3_model_name_or_path", "a diffusers SD3.5 folder")
    missing = [f"{sub}/{name}" for sub, name in SD3_LAYOUT.items() if not (folder / sub / name).is_file()]
    if missing:
        raise ModelPathError(
            f"{SD3_ENV} (--sd3_model_name_or_path) = {path!r} is not a diffusers SD3.5 folder: missing "
            f"{', '.join(missing)}. Expected transformer/, vae/ and scheduler/ subfolders "
            "(e.g. UniPic2-SD3.5M-Kontext-2B)."
        )
    return folder


def check_qwen_path(path: str) -> Path:
    folder = _require_dir(path, QWEN_ENV, "--qwen2_5_vl_model_name_or_path", "a Qwen2.5-VL folder")
    if not (folder / "config.json").is_file():
        raise ModelPathError(
            f"{QWEN_ENV} (--qwen2_5_vl_model_name_or_path) = {path!r} has no config.json: expected a local "
            "transformers folder of Qwen2.5-VL-3B-Instruct (config.json, *.safetensors, tokenizer files)."
        )
    return folder


def check_checkpoint_path(path: str) -> Path:
    checkpoint = Path(path).expanduser()
    if not checkpoint.is_file():
        raise ModelPathError(
            f"{CHECKPOINT_ENV} (--checkpoint) = {path!r} is not a file: expected the DeepGen_Image pretraining "
            ".pth (or unset it to keep a freshly initialised connector)."
        )
    return checkpoint


def _require_dir(path: str, env_name: str, flag: str, what: str) -> Path:
    if not path:
        raise ModelPathError(f"{env_name} is not set: export {env_name}=/path/to/{what.split()[-2]} (or pass {flag}); "
                             f"expected {what} on local disk.")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelPathError(f"{env_name} ({flag}) = {path!r} is not a directory: expected {what} on local disk.")
    return folder


def load_deepgen_model(model_args: ModelArguments, dtype: torch.dtype | None = None) -> DeepGenModel:
    """Load every part from the paths in ``model_args``, then CHECKPOINT on top; parameters stay frozen."""
    dtype = dtype or resolve_dtype(model_args.model_dtype)
    sd3 = check_sd3_path(model_args.sd3_model_name_or_path)
    qwen = check_qwen_path(model_args.qwen2_5_vl_model_name_or_path)
    checkpoint = check_checkpoint_path(model_args.checkpoint) if model_args.checkpoint else None

    model = DeepGenModel(
        lmm=Qwen2_5_VLForConditionalGeneration.from_pretrained(
            qwen, dtype=dtype, attn_implementation=model_args.attn_implementation),
        tokenizer=AutoTokenizer.from_pretrained(qwen),
        transformer=SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(sd3, subfolder="vae", torch_dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler"),
        connector_config=ConnectorConfig(
            hidden_size=model_args.connector_hidden_size,
            intermediate_size=model_args.connector_intermediate_size,
            num_hidden_layers=model_args.connector_num_layers,
            num_attention_heads=model_args.connector_num_heads,
        ),
        num_queries=model_args.num_queries,
        num_fusion_layers=model_args.num_fusion_layers,
        max_prompt_length=model_args.max_prompt_length,
    ).to(dtype)
    model.requires_grad_(False)
    if checkpoint is None:
        logger.warning("%s is not set: the connector, projectors and meta queries keep their random init.",
                       CHECKPOINT_ENV)
    else:
        load_checkpoint_into(model, checkpoint, model_args.trainable_modules, model_args.checkpoint_llm_lora_alpha)
    return model


def load_checkpoint_into(
    model: DeepGenModel, path: str | Path, trainable_modules: str = "dit", llm_lora_alpha: float = 128.0
) -> list[str]:
    """Load a DeepGen ``.pth`` with ``strict=False``; fail naming every trainable parameter it lacks.

    Returns the model keys that were not in the checkpoint (frozen parts that come from the model paths).
    """
    source = f"{CHECKPOINT_ENV} (--checkpoint)"
    try:
        raw = load_weights_only(path, source=source)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated / not a torch file: name the file and where it came from
        raise CheckpointError(f"{source} = {str(path)!r} could not be read: {type(err).__name__}: {err}") from err
    state_dict = merge_lora_weights(normalize_checkpoint_keys(unwrap_state_dict(raw)), llm_lora_alpha)
    lora_deltas = {k.removesuffix("@lora_delta"): state_dict.pop(k) for k in list(state_dict) if k.endswith("@lora_delta")}

    own = model.state_dict()
    wrong_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if wrong_shapes:
        raise CheckpointError(
            f"{path} does not fit the model (check --num_queries, --num_fusion_layers and the --connector_* flags):\n  "
            + "\n  ".join(wrong_shapes[:20]) + (f"\n  ... and {len(wrong_shapes) - 20} more" if len(wrong_shapes) > 20 else "")
        )
    # Exactly what training updates (set_trainable leaves out the parts no gradient reaches); LLM weights come
    # from the model path, so they are never demanded from the checkpoint.
    model.set_trainable(trainable_modules)
    required = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("lmm.")]
    model.requires_grad_(False)
    missing_required = [k for k in required if k not in state_dict]
    if missing_required:
        raise CheckpointError(
            f"{path} lacks {len(missing_required)} parameter(s) that --trainable_modules {trainable_modules} trains:\n  "
            + "\n  ".join(missing_required)
        )
    result = model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, delta in lora_deltas.items():
            if key not in params:
                raise CheckpointError(f"{path} has a LoRA for {key!r}, which the model does not have")
            params[key].add_(delta.to(params[key].dtype))
    frozen_gaps = [k for k in result.missing_keys if not k.startswith(("lmm.", "vae."))]
    if frozen_gaps:
        logger.warning("%s has no value for %d frozen parameter(s), which keep their initialisation, e.g. %s",
                       path, len(frozen_gaps), frozen_gaps[:5])
    if result.unexpected_keys:
        logger.warning("%s: %d key(s) not used by the model, e.g. %s", path, len(result.unexpected_keys),
                       result.unexpected_keys[:5])
    return list(result.missing_keys)

"""Build a :class:`DeepGenModel` from local model folders and a DeepGen ``.pth`` checkpoint.

1. ``SD3_5_MODEL_NAME_OR_PATH``: a diffusers folder with ``transformer/``, ``vae/`` and ``scheduler/``.
2. ``QWEN2_5_VL_MODEL_NAME_OR_PATH``: a transformers folder with the Qwen2.5-VL config, weights, tokenizer.
3. ``CHECKPOINT`` (optional): the DeepGen_Image ``.pth`` (connector, projectors, meta queries, DiT, ...),
   loaded with ``strict=False`` after key normalisation; every TRAINABLE parameter must be in it.

Tiny test models (``model/tiny.py``) are saved in the same layouts and loaded through this same code.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from ..core.model_names import CHECKPOINT_ENV, QWEN_ENV, SD3_ENV
# CheckpointError and load_checkpoint_into live in checkpoint_loading.py; imported here for existing callers.
from .checkpoint_loading import CheckpointError, load_checkpoint_into  # noqa: F401
from .connector import ConnectorConfig
from .deepgen import DeepGenModel
from .kontext import SD3Transformer2DKontextModel

logger = logging.getLogger(__name__)

# The model flags (config.ModelArguments), read by attribute and never imported: config sits above the model
# (docs/architecture.md).
ModelArguments = Any

SD3_LAYOUT = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


class ModelPathError(FileNotFoundError):
    """A model path is unset or does not hold what it should; the message names the env variable."""


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


def assemble_deepgen_model(model_args: ModelArguments, **parts) -> DeepGenModel:
    """The joint model around its parts (``lmm``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler``), with the
    connector, projectors and meta queries sized by the flags. Shared by :func:`load_deepgen_model` and the
    weight-less real-size build (model/meta.py)."""
    return DeepGenModel(
        **parts,
        connector_config=ConnectorConfig(
            hidden_size=model_args.connector_hidden_size,
            intermediate_size=model_args.connector_intermediate_size,
            num_hidden_layers=model_args.connector_num_layers,
            num_attention_heads=model_args.connector_num_heads,
        ),
        num_queries=model_args.num_queries,
        num_fusion_layers=model_args.num_fusion_layers,
        max_prompt_length=model_args.max_prompt_length,
    )


@contextlib.contextmanager
def created_in(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """New tensors are created in ``dtype`` on ``device`` (torch's default dtype and device context).

    WHY: the joint model's own parts (connector, projectors, meta queries: ~0.43 B parameters at real size) were
    built in float32 on the CPU, then converted and moved: a 1.7 GB float32 host copy per rank for weights the
    checkpoint overwrites anyway.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def load_deepgen_model(model_args: ModelArguments, dtype: torch.dtype | None = None,
                       device: Optional[str | torch.device] = None) -> DeepGenModel:
    """Load every part from the paths in ``model_args``, then CHECKPOINT on top; parameters stay frozen.

    Low host memory (one rank per GPU, 8 on a node): every part is read in ``dtype`` (never a float32 copy), the
    DiT and VAE go to ``device`` as soon as they are read, and the joint model's own parts are created there. The
    LLM moves after CHECKPOINT, whose LLM LoRA is merged into it on the CPU. ``device`` None: torch's default
    device (the CPU unless the caller set another).
    """
    dtype = dtype or resolve_dtype(model_args.model_dtype)
    device = torch.device(device) if device is not None else torch.get_default_device()
    sd3 = check_sd3_path(model_args.sd3_model_name_or_path)
    qwen = check_qwen_path(model_args.qwen2_5_vl_model_name_or_path)
    checkpoint = check_checkpoint_path(model_args.checkpoint) if model_args.checkpoint else None

    lmm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        qwen, dtype=dtype, attn_implementation=model_args.attn_implementation)
    transformer = SD3Transformer2DKontextModel.from_pretrained(
        sd3, subfolder="transformer", torch_dtype=dtype, low_cpu_mem_usage=True).to(device)
    vae = AutoencoderKL.from_pretrained(sd3, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=True).to(device)
    with created_in(dtype, device):
        model = assemble_deepgen_model(
            model_args,
            lmm=lmm,
            tokenizer=AutoTokenizer.from_pretrained(qwen),
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler"),
        )
    model.to(dtype)  # the few float32 buffers the libraries keep (as before); parameters are already in dtype
    model.requires_grad_(False)
    if checkpoint is None:
        logger.warning("%s is not set: the connector, projectors and meta queries keep their random init.",
                       CHECKPOINT_ENV)
    else:
        load_checkpoint_into(model, checkpoint, model_args.trainable_modules, model_args.checkpoint_llm_lora_alpha)
    return model.to(device)

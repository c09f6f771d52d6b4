"""The joint DeepGen model at its REAL size on the ``meta`` device: every shape, no weight read, no memory.

Built from the config files of the same model folders ``load_deepgen_model`` reads (``config.json`` of
Qwen2.5-VL and its tokenizer; ``transformer/``, ``vae/`` and ``scheduler/`` configs of the SD3.5 folder) and
assembled by the same code (``assemble_deepgen_model``), so parameter counts, forward shapes and checkpoint key
mapping can be checked at real size in CI, and memory can be estimated (deepgen_rl/estimate_memory.py).
Tensor VALUES do not exist on ``meta``: only shape-level code (counts, forward shapes, key mapping) runs on it,
and the LLM uses eager attention there (see below).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .deepgen import DeepGenModel
from .kontext import SD3Transformer2DKontextModel
from .loading import ModelArguments, assemble_deepgen_model, check_qwen_path, check_sd3_path

META = torch.device("meta")


def build_deepgen_model_on_meta(model_args: ModelArguments, dtype: torch.dtype = torch.bfloat16) -> DeepGenModel:
    """The DeepGen model of ``model_args``' folders with every parameter and buffer on ``meta`` in ``dtype``.

    CHECKPOINT is not read (its keys can be mapped onto the result with ``load_checkpoint_into``, which only
    checks shapes on ``meta``). Parameters are frozen, as ``load_deepgen_model`` leaves them.
    """
    sd3 = check_sd3_path(model_args.sd3_model_name_or_path)
    qwen = check_qwen_path(model_args.qwen2_5_vl_model_name_or_path)
    qwen_config = Qwen2_5_VLConfig.from_pretrained(qwen)
    # Eager attention on meta: the sdpa path asks whether the padding mask is all ones (a value meta tensors do
    # not have); eager builds the same-shaped mask without reading it. Shapes and parameters are identical.
    qwen_config._attn_implementation = "eager"
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler")
    transformer_config = SD3Transformer2DKontextModel.load_config(sd3, subfolder="transformer")
    vae_config = AutoencoderKL.load_config(sd3, subfolder="vae")
    with META:
        model = assemble_deepgen_model(
            model_args,
            lmm=Qwen2_5_VLForConditionalGeneration(qwen_config),
            tokenizer=tokenizer,
            transformer=SD3Transformer2DKontextModel.from_config(transformer_config),
            vae=AutoencoderKL.from_config(vae_config),
            scheduler=scheduler,
        )
    model.to(dtype)
    model.requires_grad_(False)
    return model

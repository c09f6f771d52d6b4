"""The published config files of the real DeepGen parts, to build the model at real size without weights.

Qwen2.5-VL-3B-Instruct (``config.json`` in its published flat layout: text fields at the top level, a nested
``vision_config``), the SD3.5-Medium Kontext DiT as UniPic2-SD3.5M-Kontext-2B ships it (``_class_name``
``SD3Transformer2DKontextModel``, which diffusers reads into ``SD3Transformer2DModel``), the SD3.5 VAE and the
flow-matching scheduler (shift 3.0). :func:`write_published_configs` writes them in the on-disk layouts
``load_deepgen_model`` / ``build_deepgen_model_on_meta`` read, so the memory estimator works before any
download and CI checks real sizes. The tokenizer written beside them is the tiny in-memory BPE with Qwen's
special tokens (the real one is a download): prompt token counts differ from the real tokenizer's, shapes do not.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN2_5_VL_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

SD35M_KONTEXT_TRANSFORMER_CONFIG = {
    "_class_name": "SD3Transformer2DKontextModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

SD35_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

SD35_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def write_published_configs(root: str | Path) -> tuple[Path, Path]:
    """Write an SD3.5 folder and a Qwen2.5-VL folder (configs + a stand-in tokenizer, no weights) under ``root``.

    Returns ``(sd3_dir, qwen_dir)``, usable as --sd3_model_name_or_path / --qwen2_5_vl_model_name_or_path for
    ``build_deepgen_model_on_meta``.
    """
    from .tiny import build_tiny_tokenizer

    root = Path(root)
    sd3, qwen = root / "sd3", root / "qwen2_5_vl"
    files = {sd3 / "transformer" / "config.json": SD35M_KONTEXT_TRANSFORMER_CONFIG,
             sd3 / "vae" / "config.json": SD35_VAE_CONFIG,
             sd3 / "scheduler" / "scheduler_config.json": SD35_SCHEDULER_CONFIG,
             qwen / "config.json": QWEN2_5_VL_3B_CONFIG}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2))
    build_tiny_tokenizer().save_pretrained(qwen)
    return sd3, qwen

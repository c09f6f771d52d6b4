"""CLIP embeddings through transformers, shared by pickscore, hpsv2 and aesthetic.

Legend: n images (and n prompts), D the CLIP projection width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from deepgen_rl.rewards.servers.scorers.checkpoints import require_path


def load_clip_processor(path: str, what: str, setting: str):
    """A local transformers CLIP processor folder (tokenizer + preprocessor_config.json); never downloads."""
    from transformers import AutoProcessor

    require_path(path, what, setting, kind="folder")
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def check_image_size(processor, model, what: str, setting: str) -> None:
    """The processor must crop to the image size the model's position embeddings were trained for."""
    crop = processor.image_processor.crop_size
    expected = model.config.vision_config.image_size
    if (crop["height"], crop["width"]) != (expected, expected):
        raise ValueError(f"{what}: the processor at {setting} crops to {crop['height']}x{crop['width']} but the model "
                         f"takes {expected}x{expected} images: point {setting} at the processor of this model.")


@torch.no_grad()
def clip_image_embeddings(model, processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalised projected image embeddings [n, D] (float32)."""
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    # Since transformers 5 get_*_features return the model output, the projected features as its pooler_output.
    features = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(model, processor, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings [n, D] (float32); prompts cut to the model's context length."""
    tokens = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings)
    features = model.get_text_features(input_ids=tokens["input_ids"].to(model.device),
                                       attention_mask=tokens["attention_mask"].to(model.device)).pooler_output
    return F.normalize(features.float(), dim=-1)


def cosine_scores(model, processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
    """cos(image_i, prompt_i) [n]."""
    return (clip_image_embeddings(model, processor, images) * clip_text_embeddings(model, processor, prompts)).sum(-1)

"""Reference images for the Qwen2.5-VL side of editing: pixels -> vision-tower tokens placed in the chat text.

An edit prompt names each source image ``<|vision_start|><|image_pad|><|vision_end|>`` (prompt_format.py). Here,
as Qwen2.5-VL's own processor does: its image processor resizes each image to a multiple of patch*merge pixels
and patchifies it (``pixel_values``, ``image_grid_thw`` [n_images, 3] = (t, h, w) in patches); the single
``<|image_pad|>`` of each image is expanded to t*h*w / merge^2 pads, the number of tokens the tower's merger
outputs; those pads' embeddings are replaced by the tower's output and the (m)RoPE positions come from the
LLM's ``get_rope_index`` with the grid (3-D positions for image tokens, 1-D for text).

The full ``Qwen2_5_VLProcessor`` cannot be built here (it requires a video processor, which needs torchvision;
docs/upstream_compatibility.md#dependencies-we-avoid), so its image processor (the PIL backend) is used directly, with
the same expansion rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_PAD = "<|image_pad|>"


def build_image_processor(vision_config) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's image processor with the tower's patch / merge / temporal sizes (pixel bounds: its defaults,
    56*56 to 28*28*1280 pixels, as Qwen2.5-VL-Instruct's preprocessor_config.json)."""
    return Qwen2VLImageProcessorPil(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                                    temporal_patch_size=vision_config.temporal_patch_size)


@dataclass
class VisionInputs:
    pixel_values: torch.Tensor  # [sum of patches, C*t*p*p], every image of the batch in order
    image_grid_thw: torch.Tensor  # [n_images, 3] (t, h, w) in patches
    texts: list[str]  # chat texts with each image's pads expanded


def prepare_vision_inputs(processor: Qwen2VLImageProcessorPil, texts: Sequence[str],
                          images: Sequence[Sequence[torch.Tensor]]) -> VisionInputs:
    """texts (each with one ``<|image_pad|>`` per image) and per text its images [3, H, W] float in [0, 1]
    -> the vision tower's inputs and the texts with pads expanded to the tower's token counts."""
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} edit prompts but {len(images)} lists of source images")
    flat = [image for row in images for image in row]
    if not flat:
        raise ValueError("no source image in the batch: encode text-to-image prompts with encode_prompt")
    processed = processor(images=[image.float().cpu() for image in flat], do_rescale=False, return_tensors="pt")
    grid = processed["image_grid_thw"]
    counts = (grid.prod(dim=-1) // processor.merge_size ** 2).tolist()
    expanded, start = [], 0
    for text, row in zip(texts, images):
        expanded.append(expand_image_pads(text, counts[start: start + len(row)]))
        start += len(row)
    return VisionInputs(pixel_values=processed["pixel_values"], image_grid_thw=grid, texts=expanded)


def expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Replace the k-th ``<|image_pad|>`` of ``text`` by counts[k] of them; the numbers must agree."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"edit prompt has {len(parts) - 1} image placeholders for {len(counts)} source images: "
                         f"{text[:120]!r}")
    return parts[0] + "".join(IMAGE_PAD * count + part for count, part in zip(counts, parts[1:]))


def scatter_image_features(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                           features: torch.Tensor) -> torch.Tensor:
    """text_embeds [B, L, H] with the ``<|image_pad|>`` rows (input_ids [B, L]) replaced, in order, by the vision
    tower's features [n_pads, H]."""
    positions = (input_ids == image_token_id).to(text_embeds.device)
    if int(positions.sum()) != features.shape[0]:
        raise ValueError(f"{int(positions.sum())} image pad tokens but {features.shape[0]} vision tower tokens")
    return text_embeds.masked_scatter(positions[..., None], features.to(text_embeds.dtype))

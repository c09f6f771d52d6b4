"""Reference images for the Qwen2.5-VL side of editing: pixels -> vision-tower tokens placed in the chat text.

An edit prompt names each source image ``<|vision_start|><|image_pad|><|vision_end|>`` (prompt_format.py). The
tower's input is made as DeepGen made it in training (its fusion model's ``get_semantic_features_dynamic``), NOT
by Qwen's own image processor (which resizes to its own pixel bounds with bicubic resampling: 324 tokens for a
512^2 source where the weights saw 256):

    source [3, H, W] in [0, 1], the VAE-size image (H, W multiples of ``vision_side_multiple``: 32 for 14 x 2)
    -> x 28/32, bilinear (align_corners False)                              [3, 7H/8, 7W/8]   (512 -> 448)
    -> CLIP mean/std normalisation
    -> Qwen2.5-VL patches: t copies in time, p x p patches ordered by m x m merge block   [h*w, 3*t*p*p]
    grid (t, h, w) = (1, 7H/8p, 7W/8p) in patches; the tower's merger outputs h*w / m^2 tokens (512^2 -> 256)

The single ``<|image_pad|>`` of each image is expanded to that many pads, whose embeddings are replaced by the
tower's output; the (m)RoPE positions come from the LLM's ``get_rope_index`` with the grid (3-D positions for
image tokens, 1-D for text). An image tensor that appears in several rows (an edit and its CFG negative) goes
through the tower once, its tokens reused, as DeepGen reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IMAGE_PAD = "<|image_pad|>"
# CLIP's normalisation (the Qwen2.5-VL tower's, and the one DeepGen applies to its sources).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# DeepGen feeds the tower the VAE-size source scaled by 28/32: a side of 32k pixels becomes 28k = k merged
# 14 x 2 patches (512 -> 448 -> 16 x 16 tokens).
VISION_SCALE = 28 / 32


def vision_side_multiple(vision_config) -> int:
    """The multiple a source side must be for 28/32 of it to be whole merged patches: 32 for Qwen2.5-VL's
    patch 14 x merge 2 (a side 8k scales to 7k, a multiple of p*m when k is one of p*m / gcd(7, p*m))."""
    unit = vision_config.patch_size * vision_config.spatial_merge_size
    return 8 * unit // math.gcd(7, unit)


def vision_pixels(image: torch.Tensor, vision_config) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One source [3, H, W] float in [0, 1] -> (the tower's patches [h*w, 3*t*p*p] float32, grid (1, h, w)).

    Computed in float32 whatever the model dtype (the tower casts to its own); the scaling runs on [-1, 1]
    values, the range DeepGen's sources have when it scales them, so the arithmetic is the same.
    """
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    temporal = vision_config.temporal_patch_size
    height, width = image.shape[-2:]
    multiple = vision_side_multiple(vision_config)
    if height % multiple or width % multiple:
        raise ValueError(f"source image of size {(height, width)} (H, W): both must be multiples of {multiple} "
                         f"pixels for the vision tower (28/32 of them whole {patch}x{merge} merged patches); "
                         "resize it when loading the edit dataset")
    signed = image.detach().to("cpu", torch.float32)[None] * 2 - 1  # [1, 3, H, W] in [-1, 1]
    scaled = (F.interpolate(signed, scale_factor=VISION_SCALE, mode="bilinear") + 1) / 2
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((scaled - mean) / std)[0]  # [3, h*p, w*p]
    channels, rows, cols = pixels.shape[0], pixels.shape[1] // patch, pixels.shape[2] // patch
    # [t, c, h/m, m, p, w/m, m, p] -> [h/m, w/m, m, m, c, t, p, p]: patches ordered by merge block, each
    # flattened channel-major, as the tower's patch embedding and merger expect.
    blocks = pixels[None].expand(temporal, -1, -1, -1).reshape(
        temporal, channels, rows // merge, merge, patch, cols // merge, merge, patch)
    patches = blocks.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(rows * cols, channels * temporal * patch * patch)
    return patches, (1, rows, cols)


@dataclass
class VisionInputs:
    pixel_values: torch.Tensor  # [sum of patches, 3*t*p*p] of each DISTINCT image, in first-use order
    image_grid_thw: torch.Tensor  # [n_distinct, 3] (t, h, w) in patches
    image_index: list[int]  # per image occurrence (rows in order, then images in a row): its distinct image
    texts: list[str]  # chat texts with each image's pads expanded

    @property
    def occurrence_grid_thw(self) -> torch.Tensor:
        """[n_occurrences, 3]: the grid of every image as it appears in the texts (what get_rope_index reads)."""
        return self.image_grid_thw[self.image_index]


def prepare_vision_inputs(vision_config, texts: Sequence[str],
                          images: Sequence[Sequence[torch.Tensor]]) -> VisionInputs:
    """texts (each with one ``<|image_pad|>`` per image) and per text its images [3, H, W] float in [0, 1]
    -> the vision tower's inputs and the texts with pads expanded to the tower's token counts. The same tensor
    object in several places is prepared (and later encoded) once."""
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} edit prompts but {len(images)} lists of source images")
    flat = [image for row in images for image in row]
    if not flat:
        raise ValueError("no source image in the batch: encode text-to-image prompts with encode_prompt")
    distinct: dict[int, int] = {}
    patches, grids = [], []
    for image in flat:
        if id(image) not in distinct:
            distinct[id(image)] = len(distinct)
            pixels, grid = vision_pixels(image, vision_config)
            patches.append(pixels)
            grids.append(grid)
    image_index = [distinct[id(image)] for image in flat]
    merge = vision_config.spatial_merge_size
    counts = [grids[i][1] * grids[i][2] // merge ** 2 for i in image_index]
    expanded, start = [], 0
    for text, row in zip(texts, images):
        expanded.append(expand_image_pads(text, counts[start: start + len(row)]))
        start += len(row)
    return VisionInputs(pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids, dtype=torch.long),
                        image_index=image_index, texts=expanded)


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

"""Tensor images -> one picture: the grid of samples the trainer logs and the synthetic report captions."""

from __future__ import annotations

import math

import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """images [N, 3, H, W] float in [0, 1] -> one RGB image with ``columns`` images per row."""
    n, _, height, width = images.shape
    rows = math.ceil(n / columns)
    grid = torch.zeros(3, rows * height, columns * width)
    for index in range(n):
        r, c = divmod(index, columns)
        grid[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = images[index].detach().float().cpu()
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)

"""Image statistics of the rollouts, the signals a hacked reward moves (pure functions of pixels; numpy + PIL).

Legend: H, W image size; an image is an RGB array [H, W, 3] of uint8 (0..255) or a PIL image; values below are on
the [0, 1] scale (pixel / 255) unless stated.

    brightness        mean luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)
    saturation        mean HSV saturation (max - min) / max per pixel (0 where max = 0)
    contrast          standard deviation of Y (RMS contrast)
    high_frequency    variance of the 4-neighbour Laplacian of Y over the interior pixels (blur lowers it,
                      grids, noise and over-sharpening raise it)
    colourfulness     Hasler & Suesstrunk (2003): rg = R - G, yb = (R + G) / 2 - B,
                      C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)
    jpeg_bpp          bits per pixel of the image as a JPEG at quality 75 (8 x bytes / (H x W)): detail content
    diversity         per group: mean pairwise RMS distance of its images at DIVERSITY_SIZE x DIVERSITY_SIZE
                      (collapse to one image drives it to 0)

Standard deviations and variances are population ones (ddof 0).
"""

from __future__ import annotations

import io
from itertools import combinations
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray]

LUMA = np.array([0.299, 0.587, 0.114])
JPEG_QUALITY = 75
DIVERSITY_SIZE = 16  # low resolution of the diversity distance: what a group's images share, not their noise
# Per-image statistics, in the order monitor.png and the metrics list them.
IMAGE_STATS: tuple[str, ...] = ("brightness", "saturation", "contrast", "high_frequency", "colourfulness",
                                "jpeg_bpp")
STATS: tuple[str, ...] = IMAGE_STATS + ("diversity",)


def as_rgb(image: ImageLike) -> np.ndarray:
    """[H, W, 3] float64 in [0, 1] from a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3]; got shape {array.shape}")
    return array.astype(np.float64) / 255.0


def luma(rgb: np.ndarray) -> np.ndarray:
    """rgb [H, W, 3] in [0, 1] -> Y [H, W] (BT.601 weights)."""
    return rgb @ LUMA


def brightness(rgb: np.ndarray) -> float:
    """Mean luma of rgb [H, W, 3] in [0, 1]."""
    return float(luma(rgb).mean())


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation (max - min) / max of rgb [H, W, 3] (0 for black pixels)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)  # ~10x faster than max(axis=-1)
    per_pixel = (high - low) / np.where(high > 0, high, 1.0)  # black (high = low = 0): 0 / 1
    return float(per_pixel.mean())


def contrast(rgb: np.ndarray) -> float:
    """RMS contrast: the standard deviation of the luma of rgb [H, W, 3]."""
    return float(luma(rgb).std())


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of L = Y[i-1,j] + Y[i+1,j] + Y[i,j-1] + Y[i,j+1] - 4 Y[i,j] over the (H-2) x (W-2) interior
    pixels of rgb [H, W, 3] (0 for images under 3 x 3)."""
    y = luma(rgb)
    if y.shape[0] < 3 or y.shape[1] < 3:
        return 0.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness of rgb [H, W, 3] in [0, 1] (the paper's values / 255)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def jpeg_bits_per_pixel(image: ImageLike, quality: int = JPEG_QUALITY) -> float:
    """8 x (bytes of the image as a JPEG at ``quality``) / (H x W)."""
    pil = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return 8.0 * buffer.tell() / (pil.width * pil.height)


def image_stats(image: ImageLike) -> dict[str, float]:
    """Every per-image statistic (IMAGE_STATS) of one image."""
    rgb = as_rgb(image)
    return {"brightness": brightness(rgb), "saturation": saturation(rgb), "contrast": contrast(rgb),
            "high_frequency": laplacian_variance(rgb), "colourfulness": colourfulness(rgb),
            "jpeg_bpp": jpeg_bits_per_pixel(image)}


def low_res(image: ImageLike, size: int = DIVERSITY_SIZE) -> np.ndarray:
    """[size, size, 3] float64 in [0, 1]: the image box-filtered down (an image already that size is unchanged)."""
    pil = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BOX)
    return np.asarray(pil).astype(np.float64) / 255.0


def group_diversity(images: Sequence[np.ndarray]) -> float:
    """Mean over the pairs of a group of ||a - b|| / sqrt(D), images [H, W, 3] (same shape, D = H W 3) in [0, 1];
    NaN for a group of one."""
    flat = [np.asarray(image, np.float64).ravel() for image in images]
    if len(flat) < 2:
        return float("nan")
    distances = [np.sqrt(np.mean(np.square(a - b))) for a, b in combinations(flat, 2)]
    return float(np.mean(distances))


def batch_stats(images: Sequence[ImageLike], group_ids: Sequence[int]) -> dict[str, tuple[float, float, int]]:
    """(sum, sum of squares, count) of each statistic (STATS) over one rank's step, over its GROUPS: a group's
    value of a per-image statistic is the mean over its images, diversity is one value per group of two or more
    images (the drift alarm's unit is the group, alarms.py says why). Moments, so ranks add up before the mean.
    Non-finite values (a broken image) are left out."""
    per_group: dict[int, dict[str, list[float]]] = {}
    lows: dict[int, list[np.ndarray]] = {}
    for image, group in zip(images, group_ids):
        values = per_group.setdefault(int(group), {name: [] for name in IMAGE_STATS})
        for name, value in image_stats(image).items():
            if np.isfinite(value):
                values[name].append(value)
        lows.setdefault(int(group), []).append(low_res(image))
    totals = {name: [0.0, 0.0, 0] for name in STATS}

    def add(name: str, value: float) -> None:
        totals[name][0] += value
        totals[name][1] += value * value
        totals[name][2] += 1

    for group, values in per_group.items():
        for name, items in values.items():
            if items:
                add(name, float(np.mean(items)))
        diversity = group_diversity(lows[group])
        if np.isfinite(diversity):
            add("diversity", diversity)
    return {name: (total, squares, count) for name, (total, squares, count) in totals.items()}


def means(sums: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{stat: sum / count} from (sum, [sum of squares,] count) (NaN where nothing was counted)."""
    return {name: (moments[0] / moments[-1] if moments[-1] else float("nan")) for name, moments in sums.items()}

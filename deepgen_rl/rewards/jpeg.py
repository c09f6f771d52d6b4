"""``jpeg_compressibility``: a local reward that needs no server, no model and no network.

    r = 1 - jpeg_bytes / raw_bytes       (JPEG at quality 95; raw_bytes = H * W * 3, the uncompressed RGB size)

i.e. the fraction of bytes JPEG saves: near 1 for flat, simple images, lower for busy, noisy ones; higher is
better and the value does not depend on the resolution. It is the "compressibility" task of DDPO / Flow-GRPO
(they use minus the size in kB; GRPO's group normalisation makes the two equivalent up to scale). Cheap and
deterministic, it is the reward of the tiny test runs (the quick start and the learning test use synthetic_match).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch

# Quality of DDPO's / Flow-GRPO's compressibility reward.
JPEG_QUALITY = 95


def jpeg_compressibility(image: Image.Image) -> float:
    """1 - (JPEG size at quality 95) / (H * W * 3) for one image."""
    rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return 1.0 - buffer.tell() / (rgb.width * rgb.height * 3)


class JpegCompressibilityReward:
    name = "jpeg_compressibility"
    # 1 - jpeg/raw bytes: below 0 only when JPEG is larger than the raw pixels (tiny or pure-noise images).
    score_range = (float("-inf"), 1.0)
    service = "in-process JPEG encoder (no server)"

    def check_ready(self) -> None:
        """Nothing to check: the reward is computed in-process."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        check_batch(images, prompts, group_ids)
        values: list[Optional[float]] = []
        errors: list[Optional[str]] = []
        for image in images:
            try:
                values.append(jpeg_compressibility(image))
                errors.append(None)
            except (OSError, ValueError) as err:
                values.append(None)
                errors.append(f"JPEG encoding failed: {err}")
        return RewardScores(values=values, errors=errors)

    def close(self) -> None:
        """Nothing to release."""

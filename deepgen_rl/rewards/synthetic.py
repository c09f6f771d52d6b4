"""``synthetic_match``: a synthetic prompt -> image task with an exact, local reward (no model, no server).

Prompts name one or two objects from a small vocabulary, e.g. ``"a red circle on the left"`` or
``"a blue square on the top, a yellow circle on the bottom"``. Each prompt has exactly one rendering
(``render_prompt``): a white canvas, each object filled in its colour, centred in its half of the image. The
reward compares a generated image with that rendering, object by object, through a soft colour membership:

    m_c(p) = exp(-||p - c||^2 / (2 tau^2))          p: a pixel's RGB in [0, 1], c: the named colour, tau 0.25
    score(object) = sum(m_c * M) / (sum(M) + sum(m_c * (1 - M)))     M: the object's rendered mask
    r = mean over the prompt's objects of score(object), in [0, 1]

i.e. a soft intersection-over-union of "pixels of the named colour" with "where the object should be": 1 for
the exact rendering, ~0 when the named colour is absent or sits in the wrong half; the wrong shape at the right
place keeps the overlap (a circle inside its square scores pi/4). The colours (and the white background) are
>= 1 apart in RGB, so the membership of one at another is <= exp(-8) ~ 3e-4. The tiny quick-start model is pretrained on
these renderings (deepgen_rl/model/tiny_pretrain.py) and then improved by GRPO with this reward.

Legend: H, W image size; N images.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from deepgen_rl.rewards.base import RewardScores, check_batch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.7, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("circle", "square")
# Each position is a half of the image: (left, top, right, bottom) as fractions of (W, H, W, H).
POSITIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0),
}
# Two objects of one prompt occupy opposite halves (never overlapping).
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
BACKGROUND = (1.0, 1.0, 1.0)
OBJECT_FRACTION = 0.8  # object size: this fraction of the shorter side of its half
MEMBERSHIP_TAU = 0.25
_OBJECT = re.compile(r"an? (\w+) (\w+) on the (\w+)")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str

    def describe(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.position}"


def parse_prompt(prompt: str) -> Optional[tuple[SceneObject, ...]]:
    """``"a red circle on the left, a blue square on the right"`` -> its objects; None if not of the grammar."""
    parts = [part.strip() for part in prompt.strip().rstrip(".").lower().split(",")]
    objects = []
    for part in parts:
        match = _OBJECT.fullmatch(part)
        if match is None or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in POSITIONS:
            return None
        objects.append(SceneObject(match[1], match[2], match[3]))
    if not 1 <= len(objects) <= 2:
        return None
    if len(objects) == 2 and OPPOSITE[objects[0].position] != objects[1].position:
        return None
    return tuple(objects)


def all_prompts(max_objects: int = 2) -> list[str]:
    """Every prompt of the grammar (one object: 32; two objects of different colours in opposite halves:
    192 more)."""
    singles = [SceneObject(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]
    prompts = [obj.describe() for obj in singles]
    if max_objects >= 2:
        prompts += [f"{a.describe()}, {b.describe()}" for a, b in itertools.product(singles, singles)
                    if OPPOSITE[a.position] == b.position and a.colour != b.colour]
    return prompts


def _object_box(obj: SceneObject, height: int, width: int) -> tuple[float, float, float, float]:
    left, top, right, bottom = POSITIONS[obj.position]
    x0, y0, x1, y1 = left * width, top * height, right * width, bottom * height
    size = OBJECT_FRACTION * min(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2


def object_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """[H, W] bool: where ``obj`` is drawn by ``render_prompt``."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    box = _object_box(obj, height, width)
    box = (box[0], box[1], box[2] - 1, box[3] - 1)  # PIL boxes include their end pixel
    if obj.shape == "circle":
        draw.ellipse(box, fill=255)
    else:
        draw.rectangle(box, fill=255)
    return np.asarray(mask) > 127


def _to_uint8(colour: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(round(255 * v) for v in colour)


def render_prompt(prompt: str, height: int, width: int) -> Image.Image:
    """The one exact rendering of a prompt of the grammar (ValueError naming the prompt otherwise)."""
    objects = parse_prompt(prompt)
    if objects is None:
        raise ValueError(f"prompt {prompt!r} is not of the synthetic grammar ('a <colour> <shape> on the "
                         f"<position>', colours {list(COLOURS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}).")
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = _to_uint8(BACKGROUND)
    for obj in objects:
        canvas[object_mask(obj, height, width)] = _to_uint8(COLOURS[obj.colour])
    return Image.fromarray(canvas)


def colour_membership(pixels: np.ndarray, colour: str) -> np.ndarray:
    """pixels [H, W, 3] float in [0, 1] -> [H, W] in (0, 1]: exp(-||p - c||^2 / (2 tau^2))."""
    distance2 = np.square(pixels - np.asarray(COLOURS[colour])).sum(axis=-1)
    return np.exp(-distance2 / (2 * MEMBERSHIP_TAU ** 2))


def match_score(image: Image.Image, objects: Sequence[SceneObject]) -> float:
    """Mean over objects of the soft IoU of the named colour with the object's mask (module docstring)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    height, width = pixels.shape[:2]
    scores = []
    for obj in objects:
        membership = colour_membership(pixels, obj.colour)
        mask = object_mask(obj, height, width)
        inside = float(membership[mask].sum())
        scores.append(inside / (mask.sum() + float(membership[~mask].sum())))
    return float(np.mean(scores))


class SyntheticMatchReward:
    name = "synthetic_match"
    score_range = (0.0, 1.0)
    service = "in-process synthetic scene matcher (no server)"

    def check_ready(self) -> None:
        """Nothing to check: the reward is computed in-process."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        check_batch(images, prompts, group_ids)
        values: list[Optional[float]] = []
        errors: list[Optional[str]] = []
        for image, prompt in zip(images, prompts):
            objects = parse_prompt(prompt)
            if objects is None:
                values.append(None)
                errors.append(f"prompt {prompt!r} is not of the synthetic_match grammar (use the prompts of "
                              "assets/rl_datasets/synthetic/ or deepgen_rl.rewards.synthetic.all_prompts())")
            else:
                values.append(match_score(image, objects))
                errors.append(None)
        return RewardScores(values=values, errors=errors)

    def close(self) -> None:
        """Nothing to release."""

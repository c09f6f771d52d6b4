"""The synthetic prompt -> image task: grammar, exact renderings, the synthetic_match reward on hand-built images,
its registry entry and the shipped dataset YAMLs / prompt files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from deepgen_rl.config import RewardArguments
from deepgen_rl.data import PromptSampler, load_dataset_config
from deepgen_rl.rewards.registry import REWARD_NAMES, build_rewards
from deepgen_rl.rewards.synthetic import (
    SceneObject,
    SyntheticMatchReward,
    all_prompts,
    match_score,
    parse_prompt,
    render_prompt,
)

pytestmark = pytest.mark.timeout(60)
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "rl_datasets" / "synthetic"
SIZE = 64


def _score(image: Image.Image, prompt: str) -> float:
    return SyntheticMatchReward().score([image], [prompt], [0]).values[0]


def _hand_drawn(boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int], str]]) -> Image.Image:
    """A white 64x64 canvas with the given (box, RGB, 'rect'|'ellipse') shapes, drawn here, not by the module."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for box, colour, kind in boxes:
        (draw.rectangle if kind == "rect" else draw.ellipse)(box, fill=colour)
    return image


def test_grammar_parses_and_rejects():
    assert parse_prompt("a red circle on the left") == (SceneObject("red", "circle", "left"),)
    assert parse_prompt("A Blue square on the top, a green circle on the bottom.") == (
        SceneObject("blue", "square", "top"), SceneObject("green", "circle", "bottom"))
    for bad in ("a purple circle on the left", "a red star on the left", "a red circle in the middle",
                "a red circle on the left, a blue square on the top",  # not opposite halves
                "a cat on a mat", ""):
        assert parse_prompt(bad) is None, bad
    prompts = all_prompts()
    assert len(prompts) == 32 + 32 * 6 and len(set(prompts)) == len(prompts)
    assert all(parse_prompt(p) is not None for p in prompts)


def test_rendering_is_the_named_colour_in_the_named_half():
    pixels = np.asarray(render_prompt("a red square on the left", SIZE, SIZE))
    red = np.all(pixels == (255, 0, 0), axis=-1)
    assert red[:, :32].sum() > 0 and red[:, 32:].sum() == 0
    # 0.8 of the 32-pixel half: a 25.6 -> 26 (or so) pixel square centred at (16, 32)
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 15.5) < 1 and abs(ys.mean() - 31.5) < 1 and 24 <= xs.max() - xs.min() + 1 <= 27


def test_ground_truth_scores_near_one_and_mismatches_near_zero():
    for prompt in ("a red circle on the left", "a blue square on the top, a yellow circle on the bottom",
                   "a green square on the right"):
        assert _score(render_prompt(prompt, SIZE, SIZE), prompt) > 0.995  # yellow vs white: exp(-8) per pixel
    # Hand-drawn: a red square in the left half (independent of the module's renderer).
    left_red = _hand_drawn([((3, 19, 28, 44), (255, 0, 0), "rect")])
    assert _score(left_red, "a red square on the left") > 0.9
    assert _score(left_red, "a blue square on the left") < 0.02  # wrong colour: membership exp(-2/0.125) ~ 1e-7
    assert _score(left_red, "a red square on the right") < 0.02  # right colour, wrong half
    assert _score(Image.new("RGB", (SIZE, SIZE), "white"), "a red square on the left") < 0.001
    # An all-red image covers the square but is mostly outside it: IoU = |square| / (64 * 64).
    all_red = Image.new("RGB", (SIZE, SIZE), (255, 0, 0))
    square = np.asarray(render_prompt("a red square on the left", SIZE, SIZE))[..., 1] == 0
    assert _score(all_red, "a red square on the left") == pytest.approx(square.sum() / SIZE ** 2, rel=1e-6)


def test_wrong_shape_and_half_right_scenes_get_partial_credit():
    # A circle inscribed in the prompted square: IoU = circle / square = pi / 4 (up to pixelisation).
    circle = render_prompt("a red circle on the left", SIZE, SIZE)
    assert _score(circle, "a red square on the left") == pytest.approx(math.pi / 4, abs=0.03)
    # Two objects, one right and one in the wrong colour: (1 + 0) / 2.
    scene = render_prompt("a red square on the top, a blue circle on the bottom", SIZE, SIZE)
    assert _score(scene, "a red square on the top, a yellow circle on the bottom") == pytest.approx(0.5, abs=0.01)


def test_reward_interface_registry_and_non_grammar_prompts():
    assert "synthetic_match" in REWARD_NAMES
    reward = build_rewards(["synthetic_match"], RewardArguments())["synthetic_match"]
    image = render_prompt("a yellow circle on the top", SIZE, SIZE)
    scores = reward.score([image, image], ["a yellow circle on the top", "a cat on a mat"], [0, 1])
    assert scores.values[0] > 0.995 and scores.values[1] is None
    assert "synthetic_match grammar" in scores.errors[1]
    assert match_score(image, parse_prompt("a yellow circle on the top")) == scores.values[0]


def test_shipped_dataset_yamls_and_prompt_files():
    assert (ASSETS / "all_prompts.txt").read_text().splitlines() == all_prompts()
    for name, rewards in (("synthetic.yaml", {"synthetic_match"}), ("synthetic_ocr.yaml", {"synthetic_match", "ocr"})):
        config = load_dataset_config(ASSETS / name, validate_paths=True)
        assert set(config.reward_names) == rewards
        sampler = PromptSampler(config, seed=0)
        synthetic = [d for d in sampler.datasets if "synthetic_match" in d.entry.rewards]
        assert synthetic and all(parse_prompt(p) is not None for d in synthetic for p in d.prompts)

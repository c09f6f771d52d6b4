"""The monitor's image statistics and the hackable rewards against values worked out by hand on tiny images.

The 2 x 2 image used throughout: red (255, 0, 0), black, white, blue (0, 0, 255); on the [0, 1] scale
  luma Y = 0.299 R + 0.587 G + 0.114 B: 0.299, 0, 1, 0.114
  HSV saturation (max - min) / max: 1, 0 (black: max 0), 0, 1
  rg = R - G: 1, 0, 0, 0;  yb = (R + G) / 2 - B: 0.5, 0, 0, -1
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from deepgen_rl.monitor import stats
from deepgen_rl.rewards.hackable import BrightnessReward, RednessReward, brightness, redness

FOUR = np.array([[[255, 0, 0], [0, 0, 0]], [[255, 255, 255], [0, 0, 255]]], dtype=np.uint8)


def test_brightness_saturation_contrast_of_four_pixels():
    rgb = stats.as_rgb(FOUR)
    mean_y = (0.299 + 0 + 1 + 0.114) / 4  # 0.35325
    assert stats.brightness(rgb) == pytest.approx(0.35325, abs=1e-12)
    assert stats.saturation(rgb) == pytest.approx(0.5, abs=1e-12)
    variance = ((0.299 - mean_y) ** 2 + mean_y ** 2 + (1 - mean_y) ** 2 + (0.114 - mean_y) ** 2) / 4
    assert stats.contrast(rgb) == pytest.approx(math.sqrt(variance), abs=1e-12)
    assert stats.contrast(rgb) == pytest.approx(0.388347, abs=1e-6)  # sqrt(0.150813...)


def test_colourfulness_of_four_pixels():
    # rg: mean 1/4, variance 1/4 - 1/16 = 3/16; yb: mean -1/8, variance (1/4 + 1) / 4 - 1/64 = 19/64
    expected = math.sqrt(3 / 16 + 19 / 64) + 0.3 * math.sqrt(1 / 16 + 1 / 64)
    assert stats.colourfulness(stats.as_rgb(FOUR)) == pytest.approx(expected, abs=1e-12)
    grey = np.full((3, 3, 3), 128, np.uint8)  # no chroma: rg = yb = 0 everywhere
    assert stats.colourfulness(stats.as_rgb(grey)) == 0.0


def test_laplacian_variance_of_one_white_pixel():
    """4 x 4 black with white at (1, 1): the interior Laplacians are L(1,1) = -4, L(1,2) = L(2,1) = 1, L(2,2) = 0;
    mean -1/2, variance (16 + 1 + 1 + 0) / 4 - 1/4 = 4.25 (grey pixels: Y = the grey level, weights sum to 1)."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[1, 1] = 255
    assert stats.laplacian_variance(stats.as_rgb(image)) == pytest.approx(4.25, abs=1e-9)
    flat = np.full((4, 4, 3), 77, np.uint8)
    assert stats.laplacian_variance(stats.as_rgb(flat)) == pytest.approx(0.0, abs=1e-20)
    assert stats.laplacian_variance(stats.as_rgb(FOUR)) == 0.0  # under 3 x 3: no interior pixel


def test_jpeg_bits_per_pixel_is_the_file_size_and_orders_detail(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 200, np.uint8)
    path = tmp_path / "noise.jpg"
    Image.fromarray(noise).save(path, format="JPEG", quality=75)
    assert stats.jpeg_bits_per_pixel(noise) == pytest.approx(8 * path.stat().st_size / (64 * 64))
    assert stats.jpeg_bits_per_pixel(Image.fromarray(noise)) == stats.jpeg_bits_per_pixel(noise)
    # the ~600 header bytes are ~1.2 bits per pixel of a 64 x 64 image: flat stays under a quarter of noise
    assert stats.jpeg_bits_per_pixel(flat) < stats.jpeg_bits_per_pixel(noise) / 4


def test_group_diversity_mean_pairwise_rms_distance():
    black = np.zeros((16, 16, 3))
    white = np.ones((16, 16, 3))
    # pairs: black-white 1, black-black 0, white-black 1 -> mean 2/3
    assert stats.group_diversity([black, white, black]) == pytest.approx(2 / 3, abs=1e-12)
    half = black.copy()
    half[:8] = 1.0
    assert stats.group_diversity([black, half]) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert math.isnan(stats.group_diversity([black]))


def test_low_res_box_filters_blocks_exactly():
    """A 32 x 32 image of 2 x 2 blocks reduces to its 16 x 16 block values (the box filter's mean of equal pixels)."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    big = blocks.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_allclose(stats.low_res(big), blocks / 255.0, atol=1e-12)


def test_batch_stats_moments_per_group():
    black = np.zeros((16, 16, 3), np.uint8)
    white = np.full((16, 16, 3), 255, np.uint8)
    sums = stats.batch_stats([black, white, white, white, black], group_ids=[0, 0, 1, 1, 2])
    # group values of the luma: group 0 (black, white) 0.5, group 1 (white, white) 1, group 2 (black) 0
    assert sums["brightness"] == (pytest.approx(1.5), pytest.approx(0.25 + 1.0), 3)
    # group 0: distance 1; group 1: 0; group 2 has one image (no pair)
    assert sums["diversity"] == (pytest.approx(1.0), pytest.approx(1.0), 2)
    assert stats.means(sums)["brightness"] == pytest.approx(0.5)
    assert set(sums) == set(stats.STATS)
    assert math.isnan(stats.means({"x": (0.0, 0.0, 0)})["x"])


def test_hackable_rewards_by_hand():
    pixels = np.array([[[255, 0, 0], [200, 80, 0]], [[255, 100, 100], [255, 255, 255]]], np.uint8)
    # max(0, R - (G + B) / 2) x 255: 255, 200 - 40 = 160, 255 - 100 = 155, 0 -> mean 570 / 4 / 255
    assert redness(Image.fromarray(pixels)) == pytest.approx(570 / 4 / 255, abs=1e-12)
    assert brightness(Image.fromarray(FOUR)) == pytest.approx(0.35325, abs=1e-12)
    images = [Image.fromarray(FOUR), Image.fromarray(pixels)]
    scores = RednessReward().score(images, ["a red circle on the left"] * 2, [0, 0])
    # FOUR: red 1, black 0, white 1 - 1 = 0, blue max(0, 0 - 1/2) = 0 -> 0.25
    assert scores.values == [0.25, pytest.approx(570 / 4 / 255)] and scores.errors == [None, None]
    assert BrightnessReward().score(images[:1], ["x"], [0]).values == [pytest.approx(0.35325)]


def test_hackable_rewards_are_registered():
    from deepgen_rl.config import RewardArguments
    from deepgen_rl.rewards.registry import build_rewards

    rewards = build_rewards(["redness", "brightness"], RewardArguments())
    assert {name: type(reward).__name__ for name, reward in rewards.items()} == {
        "redness": "RednessReward", "brightness": "BrightnessReward"}

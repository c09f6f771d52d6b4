"""The reward step: per-dataset rewards, concurrency, and failures that are excluded and counted (never 0)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from PIL import Image

from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.jpeg import JpegCompressibilityReward, jpeg_compressibility
from deepgen_rl.rewards.reward_step import RewardStep, images_to_pil
from deepgen_rl.trainer.step_metrics import reward_metrics, weighted_reward

pytestmark = pytest.mark.timeout(60)


class RecordingReward:
    """Scores an image by its red channel / 255 (+ offset); fails on prompts containing ``fail_word``."""

    score_range = (0.0, 2.0)  # red / 255 + an offset of at most 1
    service = "in-process test reward"

    def __init__(self, name: str, offset: float = 0.0, fail_word: str = "", barrier=None) -> None:
        self.name = name
        self.offset = offset
        self.fail_word = fail_word
        self.barrier = barrier
        self.calls: list[tuple[list[str], list[int]]] = []

    def check_ready(self) -> None:
        pass

    def score(self, images, prompts, group_ids) -> RewardScores:
        self.calls.append((list(prompts), list(group_ids)))
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # raises BrokenBarrierError unless the other reward runs at the same time
        values, errors = [], []
        for image, prompt in zip(images, prompts):
            if self.fail_word and self.fail_word in prompt:
                values.append(None)
                errors.append(f"{self.name} could not score {prompt!r}")
            else:
                values.append(image.getpixel((0, 0))[0] / 255 + self.offset)
                errors.append(None)
        return RewardScores(values=values, errors=errors, metrics={"calls": float(len(self.calls))})

    def close(self) -> None:
        pass


class CrashingReward(RecordingReward):
    def score(self, images, prompts, group_ids) -> RewardScores:
        raise RuntimeError("server exploded")


def red(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, 0, 0))


OCR_W = {"ocr": 0.7, "judge": 0.3}
GEN_W = {"judge": 1.0}


def test_rewards_run_only_on_the_samples_whose_dataset_uses_them():
    ocr, judge = RecordingReward("ocr"), RecordingReward("judge", offset=1.0)
    step = RewardStep({"ocr": ocr, "judge": judge}, names=["ocr", "judge"])
    images = [red(v) for v in (0, 51, 102, 153)]
    prompts = ['sign "A"', 'sign "B"', "a cat", "a dog"]
    batch = step.score(images, prompts, [OCR_W, OCR_W, GEN_W, GEN_W], [0, 0, 1, 1])
    step.close()
    assert ocr.calls == [(['sign "A"', 'sign "B"'], [0, 0])]
    assert judge.calls == [(prompts, [0, 0, 1, 1])]
    r = [v / 255 for v in (0, 51, 102, 153)]
    expected_ocr = torch.tensor([r[0], r[1], math.nan, math.nan])
    assert batch.names == ("ocr", "judge")
    assert torch.allclose(batch.scores[:, 0], expected_ocr, equal_nan=True)
    assert torch.allclose(batch.scores[:, 1], torch.tensor([x + 1 for x in r]))
    assert torch.equal(batch.weights, torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.0, 1.0], [0.0, 1.0]]))
    assert batch.valid.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert batch.failed.tolist() == [False] * 4
    # What the trainer logs and ranks by (trainer/step_metrics.py): sum_k w_k r_k over the rewards a sample uses.
    expected_sum = [0.7 * r[0] + 0.3 * (r[0] + 1), 0.7 * r[1] + 0.3 * (r[1] + 1), r[2] + 1, r[3] + 1]
    assert weighted_reward(batch.scores, batch.weights).tolist() == pytest.approx(expected_sum)
    assert batch.metrics["ocr/calls"] == 1.0


def test_a_failure_is_nan_excluded_and_counted_never_zero():
    ocr, judge = RecordingReward("ocr", fail_word="BAD"), RecordingReward("judge")
    step = RewardStep({"ocr": ocr, "judge": judge}, names=["ocr", "judge"])
    prompts = ['sign "A"', 'sign "BAD"', "a cat BAD", "a dog"]
    batch = step.score([red(10)] * 4, prompts, [OCR_W, OCR_W, GEN_W, GEN_W], [0, 0, 1, 1])
    step.close()
    # ocr failed on sample 1 (used there); it also "fails" on sample 2 but is not asked (weight 0 there).
    assert math.isnan(batch.scores[1, 0]) and not math.isnan(batch.scores[1, 1])
    assert batch.failed.tolist() == [False, True, False, False]
    assert batch.failure_counts == {"ocr": 1, "judge": 0}
    assert [(f.sample, f.reward) for f in batch.failures] == [(1, "ocr")]
    assert "BAD" in batch.failures[0].message
    # The trainer's metrics (trainer/step_metrics.py) count the failure and average over valid samples only.
    logs = reward_metrics(batch.names, batch.scores, batch.weights, batch.failed)
    assert logs["reward/ocr/failed"] == 1.0 and logs["reward/failed_samples"] == 1.0
    assert logs["reward/ocr/mean"] == pytest.approx(10 / 255)


def test_a_crashing_reward_fails_its_samples_and_the_others_still_count():
    step = RewardStep({"ocr": CrashingReward("ocr"), "judge": RecordingReward("judge")}, names=["ocr", "judge"])
    batch = step.score([red(0), red(255)], ['"a"', "b"], [OCR_W, GEN_W], [0, 1])
    step.close()
    assert batch.failed.tolist() == [True, False]
    assert batch.failure_counts["ocr"] == 1
    assert "server exploded" in batch.failures[0].message
    assert batch.scores[1, 1] == pytest.approx(1.0)


def test_rewards_run_concurrently():
    barrier = threading.Barrier(2)  # each reward waits for the other inside score(): sequential runs would break it
    step = RewardStep({"a": RecordingReward("a", barrier=barrier), "b": RecordingReward("b", barrier=barrier)})
    batch = step.score([red(1), red(2)], ["x", "y"], [{"a": 0.5, "b": 0.5}] * 2, [0, 0])
    step.close()
    assert not batch.failed.any()


def test_submit_scores_in_the_background_with_tensor_images():
    step = RewardStep({"jpeg_compressibility": JpegCompressibilityReward()})
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    future = step.submit(images, ["p"] * 4, [{"jpeg_compressibility": 1.0}] * 4, [0, 0, 1, 1])
    images.zero_()  # the caller may reuse its buffer right away
    batch = future.result(timeout=30)
    step.close()
    pil = [Image.fromarray((torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))[i] * 255).round()
                           .to(torch.uint8).permute(1, 2, 0).numpy()) for i in range(4)]
    assert batch.scores[:, 0].tolist() == pytest.approx([jpeg_compressibility(p) for p in pil])


def test_images_to_pil_maps_unit_floats_to_bytes():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0, 0, 0] = 1.0
    images[0, 1, 1, 1] = 0.5
    images[0, 2, 0, 1] = 2.0  # clamped
    (pil,) = images_to_pil(images)
    assert pil.getpixel((0, 0)) == (255, 0, 0) and pil.getpixel((1, 1)) == (0, 128, 0)
    assert pil.getpixel((1, 0)) == (0, 0, 255)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        images_to_pil(torch.zeros(3, 2, 2))


def test_bad_inputs_are_named():
    step = RewardStep({"a": RecordingReward("a")})
    with pytest.raises(ValueError, match="differ in length"):
        step.score([red(1)], ["x", "y"], [{"a": 1.0}], [0])
    with pytest.raises(ValueError, match="'zzz'"):
        step.score([red(1)], ["x"], [{"zzz": 1.0}], [0])
    step.close()
    with pytest.raises(ValueError, match="no reward function built"):
        RewardStep({"a": RecordingReward("a")}, names=["a", "b"])

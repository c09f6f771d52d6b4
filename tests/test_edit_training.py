"""Editing through the trainer: a YAML mixing text-to-image and edit datasets trains 2 steps under ZeRO-2 (in
process, the session's gloo group), with the source conditioning carried from rollout to rewards and training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepgen_rl import grpo_deepgen
from deepgen_rl.config import parse_args
from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.reward_step import RewardStep
from tests.trainer_utils import ZERO2, tiny_run_flags

pytestmark = pytest.mark.timeout(600)


class SourceDistance:
    """r = 1 - mean |edited - first source| over 8-bit pixels (sources resized to the result); a text-to-image
    row (no sources) scores its mean brightness. Records the number of sources of each row, per call (sources
    None: a step that drew no edit prompt)."""

    name = "jpeg_compressibility"
    score_range = (0.0, 1.0)
    service = "in-process test reward"
    needs_sources = True

    def __init__(self):
        self.calls: list[list[int]] = []  # per call: the number of sources of each row

    def check_ready(self):
        pass

    def score(self, images, prompts, group_ids, sources=None):
        sources = [[] for _ in images] if sources is None else sources
        assert len(sources) == len(images)
        self.calls.append([len(row) for row in sources])
        values = []
        for image, row in zip(images, sources):
            result = np.asarray(image, dtype=np.float64) / 255.0
            if row:
                source = np.asarray(row[0].convert("RGB").resize(image.size), dtype=np.float64) / 255.0
                values.append(float(1.0 - np.abs(result - source).mean()))
            else:
                values.append(float(result.mean()))
        return RewardScores(values=values, errors=[None] * len(values))

    def close(self):
        pass


def write_mixed_yaml(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (80, 48), (200, 40, 40)).save(root / "images" / "red.png")
    Image.new("RGB", (40, 40), (10, 90, 250)).save(root / "images" / "blue.png")
    records = [{"instruction": "make it green", "source_images": ["images/red.png"]},
               {"instruction": "put the blue square on it", "source_images": ["images/red.png", "images/blue.png"]}]
    (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "t2i.txt").write_text("a red apple\na blue car\n")
    (root / "mixed.yaml").write_text(
        "sampling_mode: weight_only\n"
        "datasets:\n"
        "  - {name: t2i, path: t2i.txt, sample_weight: 1.0, rewards: [{jpeg_compressibility: 1.0}]}\n"
        "  - {name: edit, path: edits.jsonl, sample_weight: 1.0, rewards: [{jpeg_compressibility: 1.0}]}\n")
    return root / "mixed.yaml"


def trainable_digests(model) -> dict[str, str]:
    return {name: hashlib.sha256(p.detach().float().numpy().tobytes()).hexdigest()
            for name, p in model.named_parameters() if p.requires_grad}


def test_mixed_yaml_trains_two_steps_with_source_conditioning(process_group, tiny_paths, tmp_path):
    yaml_path = write_mixed_yaml(tmp_path / "data")
    flags = tiny_run_flags(tiny_paths, tmp_path / "out", deepspeed=str(ZERO2), learning_rate=1e-3, max_steps=2,
                           optimizer_step_schedule="per_rollout", dataset_config=str(yaml_path),
                           trainable_modules="dit_connector", seed=3, sample_image_freq=1)
    args, *groups = parse_args(flags)
    trainer = grpo_deepgen.build_trainer(args, *groups, "cpu")
    trainer.reward_step.close()
    reward = SourceDistance()
    trainer.reward_step = RewardStep({"jpeg_compressibility": reward})
    try:
        assert trainer.model.lmm.model.visual is not None  # kept: edit prompts read their sources with it
        before = trainable_digests(trainer.model)
        assert before, "nothing trains"
        trainer.train()
        after = trainable_digests(trainer.model)
    finally:
        trainer.close()
    unchanged = [name for name in before if before[name] == after[name]]
    assert not unchanged, f"trainable parameters not updated: {unchanged[:5]}"
    # One streamed chunk per step (micro-batch 8 = all rows): a mixed chunk has text (0 sources) and edit rows.
    assert any(0 in call and max(call) > 0 for call in reward.calls), f"no step mixed both kinds: {reward.calls}"
    steps = [record for record in trainer.state.log_history if "train/step_applied" in record]
    assert len(steps) == 2
    for record in steps:
        assert record["reward/failed_samples"] == 0.0 and record["train/step_applied"] == 1.0, record
        assert record["policy/first_chunk_ratio_max_dev"] <= 1e-6, record
    check_source_column(tmp_path / "out" / "samples", reward.calls)


def check_source_column(folder: Path, calls: list[list[int]]) -> None:
    """Each step's grid: per prompt row, its source (the red image; black for text-to-image), then its 4 samples;
    a step without edit prompts keeps the plain 4-column grid."""
    for step, call in enumerate(calls, start=1):
        grid = np.asarray(Image.open(folder / f"step_{step:06d}.png"), dtype=np.float64)
        caption = (folder / f"step_{step:06d}.txt").read_text()
        if not any(call):
            assert grid.shape == (2 * 64, 4 * 64, 3) and "source" not in caption
            continue
        assert grid.shape == (2 * 64, 5 * 64, 3)
        for row in range(2):
            tile = grid[row * 64:(row + 1) * 64, :64].reshape(-1, 3).mean(0)
            expected = (200, 40, 40) if call[row * 4] else (0, 0, 0)  # both edit prompts edit the red image
            assert np.allclose(tile, expected, atol=1.0), (step, row, tile)
        assert caption.count("(first tile: source)") == 2


class Recorder:
    """A stand-in reward that records the keyword arguments it was given (what the reward step routed to it)."""

    score_range = (0.0, 1.0)
    service = "in-process test reward"

    def __init__(self, name, **declares):
        self.name, self.calls = name, []
        for key, value in declares.items():
            setattr(self, key, value)

    def check_ready(self):
        pass

    def score(self, images, prompts, group_ids, **extra):
        self.calls.append((list(prompts), extra))
        return RewardScores(values=[0.5] * len(images), errors=[None] * len(images))

    def close(self):
        pass


def test_reward_step_routes_sources_and_targets_to_the_rewards_that_declare_them():
    judge = Recorder("edit_vlm_judge", needs_sources=True)
    ocr = Recorder("ocr", needs_targets=True)
    plain = Recorder("plain")
    step = RewardStep({"edit_vlm_judge": judge, "ocr": ocr, "plain": plain})
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    src = [Image.new("RGB", (8, 8))]
    weights = [{"plain": 1.0}, {"plain": 1.0, "ocr": 1.0}, {"edit_vlm_judge": 1.0, "ocr": 1.0},
               {"edit_vlm_judge": 1.0}]
    try:
        batch = step.score(images, ["t0", "t1", "e2", "e3"], weights, [0, 0, 1, 1], sources=[[], [], src, src],
                           targets=[None, None, "SALE", None])
    finally:
        step.close()
    assert not batch.failed.any()
    assert judge.calls == [(["e2", "e3"], {"sources": [src, src]})]
    assert ocr.calls == [(["t1", "e2"], {"targets": [None, "SALE"]})]
    assert plain.calls == [(["t0", "t1"], {})]

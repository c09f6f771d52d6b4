"""Edit datasets: the JSONL format, a YAML mixing text-to-image and editing, and the source conditioning a rollout
carries (decoded and encoded once per prompt; log-probs recompute with it in any chunking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepgen_rl.data import DatasetConfigError, PromptSampler, load_dataset_config
from deepgen_rl.data.edit_prompts import read_edit_file, reference_size
from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
from deepgen_rl.sampling.edit_conditioning import build_edit_conditioning
from deepgen_rl.sampling.steps import (effective_logprob_variant, gaussian_log_prob, sample_with_coefficients,
                                      step_coefficients, step_mean)

pytestmark = pytest.mark.timeout(120)


def write_edit_set(root: Path) -> Path:
    """An edit JSONL (in edits/) whose image paths are relative to it, plus a prompt file, and a YAML mixing them."""
    (root / "edits" / "images").mkdir(parents=True)
    Image.new("RGB", (80, 48), (200, 40, 40)).save(root / "edits" / "images" / "red.png")
    Image.new("RGB", (40, 40), (10, 90, 250)).save(root / "edits" / "images" / "blue.png")
    records = [{"instruction": "make it green", "source_images": ["images/red.png"]},
               {"instruction": " put the blue square on it ", "source_images": ["images/red.png", "images/blue.png"],
                "target_text": "SALE"}]
    (root / "edits" / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (root / "t2i.txt").write_text("a red apple\na blue car\n")
    (root / "train.yaml").write_text(
        "datasets:\n"
        "  - {name: t2i, path: t2i.txt, sample_weight: 1.0, rewards: [{jpeg_compressibility: 1.0}]}\n"
        "  - {name: edit, path: edits/edits.jsonl, sample_weight: 1.0,\n"
        "     rewards: [{edit_vlm_judge: 0.7}, {image_similarity: 0.3}]}\n")
    return root / "train.yaml"


def test_edit_jsonl_resolves_images_relative_to_the_file(tmp_path):
    write_edit_set(tmp_path)
    first, second = read_edit_file(tmp_path / "edits" / "edits.jsonl", "edit")
    images = tmp_path.resolve() / "edits" / "images"
    assert (first.instruction, first.source_images, first.target_text) == ("make it green", (images / "red.png",), None)
    assert second.instruction == "put the blue square on it" and second.target_text == "SALE"
    assert second.source_images == (images / "red.png", images / "blue.png")


@pytest.mark.parametrize("line, message", [
    ("{not json", "edits.jsonl:2: not valid JSON"),
    ('{"source_images": ["images/red.png"]}', "edits.jsonl:2: 'instruction' must be a non-empty string"),
    ('{"instruction": "x", "source_images": []}', "edits.jsonl:2: 'source_images' must be a non-empty list"),
    ('{"instruction": "x", "source_images": ["images/none.png"]}', "edits.jsonl:2: source image .*none.png not found"),
    ('{"instruction": "x", "source_images": ["images/red.png"], "mask": 1}', "edits.jsonl:2: unknown key 'mask'"),
    ('{"instruction": "x", "source_images": ["images/red.png"], "target_text": 3}', "'target_text' must be a string"),
])
def test_bad_edit_lines_name_file_line_and_key(tmp_path, line, message):
    write_edit_set(tmp_path)
    path = tmp_path / "edits" / "edits.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_edit_file(path, "edit")


def test_yaml_mixes_text_to_image_and_edit_datasets(tmp_path):
    config = load_dataset_config(write_edit_set(tmp_path), validate_paths=True)
    assert [entry.is_edit for entry in config.datasets] == [False, True]
    samples = PromptSampler(config, seed=0).sample(40)
    edits = [s for s in samples if s.dataset == "edit"]
    assert 0 < len(edits) < 40 and all(s.is_edit for s in edits)
    assert all(not s.is_edit and s.source_images == () for s in samples if s.dataset == "t2i")
    assert {s.prompt for s in edits} <= {"make it green", "put the blue square on it"}
    assert all(dict(s.reward_weights) == {"edit_vlm_judge": 0.7, "image_similarity": 0.3} for s in edits)


def test_edit_reward_on_a_text_to_image_dataset_is_refused(tmp_path):
    write_edit_set(tmp_path)
    (tmp_path / "bad.yaml").write_text(
        "datasets:\n  - {name: t2i, path: t2i.txt, rewards: [{image_similarity: 1.0}]}\n")
    with pytest.raises(DatasetConfigError, match=r"datasets\[0\].rewards: image_similarity .* t2i.txt"):
        load_dataset_config(tmp_path / "bad.yaml")


def test_reference_size_keeps_the_aspect_ratio_at_the_run_scale():
    # 300x400 to ~64*64 px: scale sqrt(4096 / 120000) = 0.1848 -> 55.4 x 73.9 -> multiples of 16: 48 x 80.
    assert reference_size(300, 400, 64 * 64, 16) == (48, 80)
    assert reference_size(10, 1000, 64 * 64, 16) == (16, 640)  # never below one multiple


@pytest.fixture(scope="module")
def model():
    return build_tiny_deepgen(seed=0)


def test_conditioning_is_encoded_once_per_prompt_and_selects_rows(model, tmp_path):
    config = load_dataset_config(write_edit_set(tmp_path))
    t2i, edit = PromptSampler(config, seed=0).datasets
    cond = build_edit_conditioning(model, [t2i[0], edit[1]], group_size=2, target_area=TINY_IMAGE_SIZE ** 2)
    assert len(cond) == 4 and cond.edit_rows == [2, 3]
    assert cond.reference_latents[2] is cond.reference_latents[3]  # one encoding shared by the group
    red, blue = cond.source_images[2]
    # 80x48 and 40x40 sources at ~64*64 px, sides rounded to multiples of 32 (the vision tower's 28/32 scale
    # must give whole 14 x 2 merged patches): 80x48 * 1.03 = 83x50 -> 96x64.
    assert red.shape == (3, 64, 96) and blue.shape == (3, 64, 64)
    assert [tuple(latent.shape) for latent in cond.reference_latents[2]] == [(16, 8, 12), (16, 8, 8)]
    assert torch.allclose(red[:, 10, 10], torch.tensor([200, 40, 40]) / 255, atol=1 / 255)
    assert cond.select([0, 1]).dit_references() is None and cond.select([1, 2]).dit_references() is not None
    assert cond.source_pil()[3][1].size == (64, 64)


@torch.no_grad()
def test_rollout_log_probs_recompute_exactly_with_source_conditioning(model, tmp_path):
    """A 3-step CPS-SDE rollout of a mixed batch (2 text-to-image rows, 2 edit rows of one prompt), then each
    step's log-prob recomputed per row (chunks of 1, as training may split): equal to fp32 rounding."""
    config = load_dataset_config(write_edit_set(tmp_path))
    t2i, edit = PromptSampler(config, seed=0).datasets
    cond = build_edit_conditioning(model, [t2i[0], edit[1]], group_size=2, target_area=TINY_IMAGE_SIZE ** 2)
    t2i_embeds, t2i_pooled = model.encode_prompt([t2i[0].prompt] * 2)
    edit_embeds, edit_pooled = model.encode_edit_prompt([edit[1].prompt] * 2, cond.source_images[2:])
    # One sequence length for the batch: rollouts group rows of one kind per forward; here the test pads text rows
    # by hand only to show the DiT side (its reference mask) is chunk-independent.
    length = max(t2i_embeds.shape[1], edit_embeds.shape[1])
    pad = lambda e: torch.cat([e.new_zeros(e.shape[0], length - e.shape[1], e.shape[2]), e], 1)  # noqa: E731
    embeds, pooled = torch.cat([pad(t2i_embeds), pad(edit_embeds)]), torch.cat([t2i_pooled, edit_pooled])
    sigmas = model.sigma_schedule(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    shape = model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    variant = effective_logprob_variant("cps_sde", "reference")
    recorded = []
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        coefs = step_coefficients("cps_sde", sigmas[step], sigmas[step + 1], eta=1.0, sigma_max=float(sigmas[1]))
        v = model.predict_velocity(x, sigmas[step].expand(4), embeds, pooled, cond.dit_references())
        result = sample_with_coefficients(x, v, coefs, variant, generator, None)
        recorded.append((x, result.next_latents, result.log_prob, coefs))
        x = result.next_latents
    for step, (x_t, x_next, log_prob, coefs) in enumerate(recorded):
        for row in range(4):
            part = cond.select([row])
            v = model.predict_velocity(x_t[row:row + 1], sigmas[step].expand(1), embeds[row:row + 1],
                                       pooled[row:row + 1], part.dit_references())
            again = gaussian_log_prob(x_next[row:row + 1], step_mean(x_t[row:row + 1], v, coefs), coefs.noise_std,
                                      variant)
            torch.testing.assert_close(again, log_prob[row:row + 1], rtol=1e-5, atol=1e-6)


def test_preflight_accepts_edit_datasets_and_reports_bad_edit_lines(tmp_path):
    from deepgen_rl.preflight.content import check_prompt_contents

    config = load_dataset_config(write_edit_set(tmp_path))
    assert check_prompt_contents(config) == []
    path = tmp_path / "edits" / "edits.jsonl"
    path.write_text(path.read_text() + '{"instruction": "x", "source_images": ["images/gone.png"]}\n')
    (problem,) = check_prompt_contents(config)
    assert "edits.jsonl:4: source image" in problem and "gone.png not found" in problem


def test_mixed_conditioning_selects_rows_of_each_kind_in_order():
    from deepgen_rl.sampling.mixed_conditioning import MixedConditioning
    from deepgen_rl.sampling.trajectory import Conditioning

    # 5 rows: text rows 0, 2, 3 (embeddings of length 2), edit rows 1, 4 (length 3, with references).
    text = Conditioning(torch.arange(3.0).view(3, 1, 1).expand(3, 2, 1), torch.arange(3.0).view(3, 1))
    edit = Conditioning(torch.tensor([10.0, 11.0]).view(2, 1, 1).expand(2, 3, 1), torch.tensor([[10.0], [11.0]]),
                        references=[["r1"], ["r4"]])
    mixed = MixedConditioning((((torch.tensor([0, 2, 3])), text), (torch.tensor([1, 4]), edit)), 5)
    for rows in ([4, 0, 3], torch.tensor([4, 0, 3])):
        picked = mixed.select(rows)
        (text_pos, text_part), (edit_pos, edit_part) = picked.parts
        assert picked.num_rows == 3 and text_pos.tolist() == [1, 2] and edit_pos.tolist() == [0]
        assert text_part.pooled.flatten().tolist() == [0.0, 2.0] and edit_part.references == [["r4"]]
    only_text = mixed.select(slice(2, 4))
    assert len(only_text.parts) == 1 and only_text.parts[0][1].pooled.flatten().tolist() == [1.0, 2.0]
    # combine scatters each part's rows back to their positions (row value = its pooled value here).
    out = mixed.combine(lambda rows, part: part.pooled.expand(len(rows), 2), torch.zeros(5, 2))
    assert out[:, 0].tolist() == [0.0, 10.0, 1.0, 2.0, 11.0]


@torch.no_grad()
def test_rollout_of_a_mixed_batch_recomputes_exactly_per_micro_batch(model, tmp_path):
    """The real rollout on 2 prompts (text-to-image, edit) x G = 2 in micro-batches of 3 rows (one mixes both
    kinds): recompute_step on the same micro-batches gives the recorded log-probs; the text rows'
    embeddings equal a text-only encoding's (the edit prompt's image tokens do not pad them)."""
    from deepgen_rl.sampling import encode_conditioning, recompute_step, rollout

    config = load_dataset_config(write_edit_set(tmp_path))
    t2i, edit = PromptSampler(config, seed=0).datasets
    cond = build_edit_conditioning(model, [t2i[0], edit[1]], group_size=2, target_area=TINY_IMAGE_SIZE ** 2)
    kwargs = dict(group_size=2, sampler="cps_sde", eta=1.0, logprob_variant="reference", num_inference_steps=3,
                  height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE, cfg_scale=2.0, init_same_noise=False,
                  micro_batch_size=3)
    traj = rollout(model, [t2i[0].prompt, edit[1].prompt], generator=torch.Generator().manual_seed(0), edit=cond,
                   **kwargs)
    for step in range(2):
        for rows in (slice(0, 3), slice(3, 4)):
            again = recompute_step(model, traj, step, rows).log_prob
            torch.testing.assert_close(again, traj.log_probs[rows, step], rtol=0, atol=1e-6)
    (text_rows, text_part), (edit_rows, edit_part) = traj.conditioning.parts
    assert text_rows.tolist() == [0, 1] and edit_rows.tolist() == [2, 3] and edit_part.references is not None
    alone = encode_conditioning(model, [t2i[0].prompt], 2, 2.0)
    assert torch.equal(text_part.prompt_embeds, alone.prompt_embeds) and text_part.references is None


def test_preflight_parses_edit_eval_sets(tmp_path):
    from deepgen_rl.preflight.content import check_eval_contents

    write_edit_set(tmp_path)
    (tmp_path / "eval.yaml").write_text("datasets:\n  - {name: my_edits, path: edits/edits.jsonl, cfg_scale: 4.0, "
                                        "num_inference_steps: 2, duplicates: 1, scoring: edit_judge}\n")
    assert check_eval_contents(str(tmp_path / "eval.yaml")) is None
    (tmp_path / "edits" / "edits.jsonl").write_text('{"instruction": "x"}\n')
    problem = check_eval_contents(str(tmp_path / "eval.yaml"))
    assert "my_edits (scoring: edit_judge)" in problem and "edits.jsonl:1" in problem and "--eval_freq 0" in problem


def test_shipped_edit_example_mixes_with_text_to_image_and_its_sources_are_our_renderings():
    """assets/rl_datasets/edit_example: the mixed training YAML and the edit eval YAML load and pass the preflight;
    every source image is the synthetic renderer's drawing of the scene its file name spells, pixel for pixel
    (scripts/make_edit_example.py writes them)."""
    import numpy as np

    from deepgen_rl.eval.edit_eval import load_edit_eval_sets
    from deepgen_rl.preflight.content import check_eval_contents, check_prompt_contents
    from deepgen_rl.rewards.synthetic import render_prompt
    from tests.conftest import REPO_ROOT

    folder = REPO_ROOT / "assets" / "rl_datasets" / "edit_example"
    config = load_dataset_config(folder / "edit_mixed.yaml", validate_paths=True)
    assert [(entry.name, entry.is_edit) for entry in config.datasets] == [("synthetic", False), ("edit_example", True)]
    assert check_prompt_contents(config) == [] and check_eval_contents(str(folder / "edit_eval.yaml")) is None
    samples = PromptSampler(config, seed=0).sample(40)
    assert {s.dataset for s in samples} == {"synthetic", "edit_example"}
    (edit_set,) = load_edit_eval_sets(folder / "edit_eval.yaml")
    edits = read_edit_file(folder / "edits.jsonl", "edit_example")
    assert len(edits) == 8 and edit_set.prompts == tuple(edits)
    for edit in edits:
        (source,) = edit.source_images
        # "red_circle_left__blue_square_right.png" -> "a red circle on the left, a blue square on the right"
        scene = ", ".join(f"a {colour} {shape} on the {side}"
                          for colour, shape, side in (part.split("_") for part in source.stem.split("__")))
        with Image.open(source) as image:
            assert image.size == (128, 128)
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(render_prompt(scene, 128, 128))), source

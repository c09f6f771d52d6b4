"""Preflight reads what the input files contain (issue 11 item 10): each problem names its file and line, and the
launch stops before any model loads."""

from __future__ import annotations

import argparse
import csv
import json

import torch

from deepgen_rl import preflight
from deepgen_rl.data.dataset_yaml import load_dataset_config
from deepgen_rl.preflight.content import check_checkpoint_loads, check_eval_contents, check_prompt_contents

SUB_DIMS = {"Primary Categories": "Art", "Secondary Categories": "Graphic Art",
            "Testpoints": ["Attribute - Color"], "Testpoint Description": ["a red apple"]}


def _dataset_yaml(folder, datasets: dict[str, tuple[str, dict]]):
    """datasets: {name: (prompt file text, {reward: weight})} -> the YAML's path."""
    lines = ["datasets:"]
    for name, (text, rewards) in datasets.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        lines += [f"  - name: {name}", f"    path: {name}.txt", "    rewards:"]
        lines += [f"      - {reward}: {weight}" for reward, weight in rewards.items()]
    path = folder / "train.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_empty_file_and_ocr_prompts_without_quoted_text_are_named_with_their_lines(tmp_path):
    ocr_text = 'A sign reading "OPEN"\n\nA quiet forest at dawn\nA poster with "" on it\nA mug saying "HI"\n'
    config = load_dataset_config(_dataset_yaml(tmp_path, {
        "blank": ("\n   \n\n", {"jpeg_compressibility": 1.0}),
        "text": (ocr_text, {"jpeg_compressibility": 0.5, "ocr": 0.5}),
        "general": ("A quiet forest at dawn\n", {"jpeg_compressibility": 1.0}),  # no ocr: quotes not needed
        "ocr_off": ("A quiet forest at dawn\n", {"jpeg_compressibility": 1.0, "ocr": 0.0}),
    }))
    problems = check_prompt_contents(config)
    assert len(problems) == 2, problems
    empty, unquoted = problems
    assert f"prompt file {tmp_path / 'blank.txt'}" in empty and "is empty" in empty and "'blank'" in empty
    # File lines 3 (no quotes) and 4 (only an empty pair); the blank line 2 is not a prompt.
    assert f"{tmp_path / 'text.txt'}:3, {tmp_path / 'text.txt'}:4." in unquoted
    assert "2 of 4 prompts of dataset 'text'" in unquoted and "ocr reward (weight 0.5)" in unquoted
    assert ":1" not in unquoted and ":5" not in unquoted


def test_edit_rows_without_an_ocr_target_are_named_with_their_lines(tmp_path):
    # An edit's OCR target is its target_text, else a quoted span of its instruction; with neither, every ocr
    # score of that edit fails. Line 2 is blank, so the untargeted edits are on file lines 3 and 5.
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "red.png")
    rows = ['{"instruction": "write OPEN on it", "source_images": ["red.png"], "target_text": "OPEN"}', "",
            '{"instruction": "make it green", "source_images": ["red.png"]}',
            '{"instruction": "add a sign reading \\"HI\\"", "source_images": ["red.png"]}',
            '{"instruction": "add a label", "source_images": ["red.png"]}']
    (tmp_path / "edits.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name, rewards in (("with_ocr", "[{ocr: 0.5}, {jpeg_compressibility: 0.5}]"),
                          ("no_ocr", "[{jpeg_compressibility: 1.0}]")):
        (tmp_path / f"{name}.yaml").write_text(
            f"datasets:\n  - {{name: {name}, path: edits.jsonl, rewards: {rewards}}}\n")
    problems = check_prompt_contents(load_dataset_config(tmp_path / "with_ocr.yaml"))
    assert len(problems) == 1, problems
    edits = tmp_path / "edits.jsonl"
    assert f"{edits}:3, {edits}:5." in problems[0] and "2 of 4 edits of dataset 'with_ocr'" in problems[0]
    assert "target_text" in problems[0] and "ocr reward (weight 0.5)" in problems[0]
    assert check_prompt_contents(load_dataset_config(tmp_path / "no_ocr.yaml")) == []  # no ocr: no target needed


def test_non_utf8_prompt_file_names_the_line(tmp_path):
    config = load_dataset_config(_dataset_yaml(tmp_path, {"latin": ("ok\n", {"jpeg_compressibility": 1.0})}))
    (tmp_path / "latin.txt").write_bytes(b"first\nsecond\ncaf\xe9 sign\n")
    problems = check_prompt_contents(config)
    assert len(problems) == 1 and "latin.txt" in problems[0] and "on line 3" in problems[0]


def _write_eval(folder, rows: list[tuple[int, str, str]]):
    with (folder / "bench.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "prompt", "sub_dims"])
        writer.writerows(rows)
    path = folder / "eval.yaml"
    path.write_text("datasets:\n  - name: bench\n    path: bench.csv\n    cfg_scale: 4.0\n    num_inference_steps: 50\n"
                    "    duplicates: 1\n    scoring: unigenbench/en\n")
    return path


def test_eval_csv_with_broken_sub_dims_json_names_file_and_line(tmp_path):
    good = json.dumps(SUB_DIMS)
    config = _write_eval(tmp_path, [(0, "a red apple", good), (1, "a blue car", good[:-2]), (2, "a cat", good)])
    problem = check_eval_contents(str(config))
    assert problem is not None
    assert f"{tmp_path / 'bench.csv'}: line 3 (index 1)" in problem and "'sub_dims' is not valid JSON" in problem
    assert "--eval_freq 0" in problem
    assert check_eval_contents(str(_write_eval(tmp_path, [(0, "a red apple", good)]))) is None


def test_checkpoint_torch_refuses_is_named_and_a_clean_one_passes(tmp_path):
    clean = tmp_path / "clean.pth"
    torch.save({"transformer.weight": torch.ones(3)}, clean)
    assert check_checkpoint_loads(str(clean)) is None

    pickled = tmp_path / "pickled.pth"  # a non-tensor object: unpickling it would import and build arbitrary code
    torch.save({"transformer.weight": torch.ones(3), "args": argparse.Namespace(lr=1e-5)}, pickled)
    problem = check_checkpoint_loads(str(pickled))
    assert problem.startswith(f"CHECKPOINT (--checkpoint) = {pickled}: torch refuses to load it weights-only")
    assert "Unsupported global: GLOBAL argparse.Namespace" in problem and "weights_only=False" not in problem

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(clean.read_bytes()[: clean.stat().st_size // 2])
    problem = check_checkpoint_loads(str(truncated))
    assert problem.startswith(f"CHECKPOINT (--checkpoint) = {truncated}: not a readable torch checkpoint")


def test_preflight_reports_every_content_problem_and_fails(tiny_paths, tmp_path, capsys):
    yaml_path = _dataset_yaml(tmp_path, {"blank": ("\n", {"jpeg_compressibility": 1.0})})
    bad_checkpoint = tmp_path / "bad.pth"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=1)}, bad_checkpoint)
    eval_yaml = _write_eval(tmp_path, [(0, "a red apple", "{not json")])
    code = preflight.main(["--output_dir", str(tmp_path / "out"), "--dataset_config", str(yaml_path),
                           "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                           "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir),
                           "--checkpoint", str(bad_checkpoint), "--eval_dataset_config", str(eval_yaml),
                           "--eval_freq", "1", "--judge_health_timeout", "0.2",
                           "--unigenbench_api_url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"prompt file {tmp_path / 'blank.txt'}" in err
    assert f"CHECKPOINT (--checkpoint) = {bad_checkpoint}: torch refuses" in err
    assert f"{tmp_path / 'bench.csv'}: line 2" in err


def test_text_file_as_checkpoint_is_called_what_it_is(tmp_path):
    text = tmp_path / "CHECKPOINT.txt"  # e.g. a download page or a path written into a file
    text.write_text("https://example.org/deepgen_image.pth\n")
    problem = check_checkpoint_loads(str(text))
    assert problem.startswith(f"CHECKPOINT (--checkpoint) = {text}: not a torch checkpoint: it starts with text")
    assert "https://example.org" in problem and "pickles objects" not in problem

"""Eval YAML + UniGenBench CSV parsing: the real reference files, our shipped sample, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deepgen_rl.eval.dataset import (
    EvalDataError,
    load_eval_config,
    load_eval_datasets,
    load_unigenbench_csv,
    primary_dimension,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DATA = REPO_ROOT.parent / "shared" / "reference-data"
SHIPPED_EVAL_YAML = REPO_ROOT / "assets" / "rl_datasets" / "deepgen" / "eval" / "eval.yaml"
REAL_CSV_KEYS = {  # file -> (test point key, description key) read here with the csv/json modules directly
    "test_prompts_en.csv": ("Testpoints", "Testpoint Description"),
    "test_prompts_zh.csv": ("考点", "考点对应描述"),
}


def _needs_reference_data() -> Path:
    if not (REFERENCE_DATA / "unigenbench").is_dir():
        pytest.skip(f"reference data folder {REFERENCE_DATA} is absent (only on the team's machines)")
    return REFERENCE_DATA


@pytest.mark.parametrize("file_name", sorted(REAL_CSV_KEYS))
def test_real_unigenbench_csv_parses_with_every_test_point(file_name):
    path = _needs_reference_data() / "unigenbench" / file_name
    prompts = load_unigenbench_csv(path)
    with path.open(encoding="utf-8", newline="") as handle:
        raw_rows = list(csv.DictReader(handle))
    points_key, descriptions_key = REAL_CSV_KEYS[file_name]
    assert len(prompts) == len(raw_rows) == 600
    for prompt, row in zip(prompts, raw_rows):
        sub_dims = json.loads(row["sub_dims"])
        assert prompt.index == int(row["index"])
        assert prompt.prompt == row["prompt"].strip()
        assert list(prompt.test_points) == sub_dims[points_key] and prompt.test_points
        assert len(prompt.test_point_descriptions) == len(prompt.test_points)
        assert list(prompt.test_point_descriptions) == [d.strip() for d in sub_dims[descriptions_key]]
    assert sum(len(p.test_points) for p in prompts) == sum(len(json.loads(r["sub_dims"])[points_key])
                                                           for r in raw_rows)


def test_real_files_primary_dimensions():
    root = _needs_reference_data() / "unigenbench"
    english = {primary_dimension(t, "en") for p in load_unigenbench_csv(root / "test_prompts_en.csv")
               for t in p.test_points}
    assert english == {"Action", "Attribute", "Compound", "Entity Layout", "Grammar", "Logical Reasoning",
                       "Relationship", "Style", "Text Generation", "World Knowledge"}
    chinese = {primary_dimension(t, "zh") for p in load_unigenbench_csv(root / "test_prompts_zh.csv")
               for t in p.test_points}
    assert chinese == {"世界知识", "关系", "动作", "复合考点", "实体布局", "属性", "文本生成", "语法", "逻辑推理", "风格"}
    first = load_unigenbench_csv(root / "test_prompts_en.csv")[0]
    assert (first.primary_category, first.secondary_category) == ("Creative Divergence", "Imaginative Thinking")


def test_primary_dimension_rule():
    assert primary_dimension("Attribute - Quantity", "en") == "Attribute"
    assert primary_dimension("Action - Full-body (Character/Anthropomorphic)", "en") == "Action"
    assert primary_dimension("Text Generation (Case-insensitive)", "en") == "Text Generation (Case-insensitive)"
    assert primary_dimension("Style", "en") == "Style"
    assert primary_dimension("动作-人物/拟人全身动作", "zh") == "动作"
    assert primary_dimension("风格", "zh") == "风格"


def test_real_eval_yaml_resolves_relative_path():
    root = _needs_reference_data()
    (spec,) = load_eval_config(root / "eval.yaml")
    assert spec.name == "unigenbench_en"
    assert spec.path == (root / "unigenbench" / "test_prompts_en.csv").resolve()
    assert (spec.cfg_scale, spec.num_inference_steps, spec.duplicates) == (4.0, 50, 4)
    assert (spec.scoring, spec.language) == ("unigenbench/en", "en")
    (dataset,) = load_eval_datasets(root / "eval.yaml", max_prompts=7)
    assert [p.index for p in dataset.prompts] == list(range(7))


def test_shipped_eval_yaml_parses():
    if not SHIPPED_EVAL_YAML.is_file():
        pytest.skip(f"{SHIPPED_EVAL_YAML} is not in this checkout yet (shipped with the data issue)")
    datasets = load_eval_datasets(SHIPPED_EVAL_YAML)
    assert datasets and all(d.prompts for d in datasets)
    for dataset in datasets:
        assert all(len(p.test_points) == len(p.test_point_descriptions) > 0 for p in dataset.prompts)


# ---- bad input: the error names the file, the row and the key ----

def _write_csv(path: Path, rows: list[list[str]], header=("index", "prompt", "sub_dims")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _sub_dims(points, descriptions) -> str:
    return json.dumps({"Primary Categories": "Art", "Testpoints": points, "Testpoint Description": descriptions})


GOOD_ROW = ["0", "a cat", _sub_dims(["Style"], ["ink"])]


@pytest.mark.parametrize("bad_row, message", [
    (["1", "a dog", _sub_dims(["Style", "World Knowledge"], ["ink"])],
     "2 test points ('Testpoints') but 1 descriptions ('Testpoint Description')"),
    (["1", "a dog", "{not json"], "column 'sub_dims' is not valid JSON"),
    (["x", "a dog", _sub_dims(["Style"], ["ink"])], "column 'index' must be an integer"),
    (["1", "", _sub_dims(["Style"], ["ink"])], "column 'prompt' is empty"),
    (["1", "a dog", json.dumps({"Testpoint Description": ["ink"]})], "no key 'Testpoints' or '考点'"),
    (["1", "a dog", _sub_dims([], [])], "sub_dims key 'Testpoints' is empty"),
    (["1", "a dog", _sub_dims("Style", ["ink"])], "sub_dims key 'Testpoints' must be a list"),
    (["0", "a dog", _sub_dims(["Style"], ["ink"])], "column 'index' value 0 appears twice"),
])
def test_bad_csv_row_is_named(tmp_path, bad_row, message):
    path = _write_csv(tmp_path / "bench.csv", [GOOD_ROW, bad_row])
    with pytest.raises(EvalDataError) as info:
        load_unigenbench_csv(path)
    text = str(info.value)
    assert str(path) in text and message in text
    if "appears twice" not in message:
        assert "line 3" in text  # header = line 1, good row = line 2


def test_bad_csv_header_and_missing_file(tmp_path):
    path = _write_csv(tmp_path / "bench.csv", [["0", "a cat"]], header=("index", "prompt"))
    with pytest.raises(EvalDataError, match="missing column\\(s\\) sub_dims"):
        load_unigenbench_csv(path)
    with pytest.raises(EvalDataError, match="does not exist"):
        load_unigenbench_csv(tmp_path / "nope.csv")


ENTRY = {"name": "bench", "path": "bench.csv", "cfg_scale": 4.0, "num_inference_steps": 50, "duplicates": 4,
         "scoring": "unigenbench/zh"}


def _write_yaml(tmp_path: Path, entries) -> Path:
    import yaml

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries}), encoding="utf-8")
    return path


def test_good_yaml_and_language(tmp_path):
    _write_csv(tmp_path / "bench.csv", [GOOD_ROW])
    (dataset,) = load_eval_datasets(_write_yaml(tmp_path, [ENTRY]))
    assert dataset.spec.language == "zh" and dataset.spec.path == (tmp_path / "bench.csv").resolve()
    assert dataset.prompts[0].test_points == ("Style",)


@pytest.mark.parametrize("change, message", [
    ({"duplicates": 0}, "key 'duplicates' must be a positive integer"),
    ({"num_inference_steps": "fifty"}, "key 'num_inference_steps' must be int"),
    ({"cfg_scale": -1.0}, "key 'cfg_scale' must be >= 0"),
    ({"scoring": "geneval"}, "key 'scoring' must be one of"),
    ({"duplicate": 4}, "unknown key(s) duplicate"),
    ({"duplicates": None}, "key 'duplicates' must be int"),
])
def test_bad_yaml_entry_is_named(tmp_path, change, message):
    path = _write_yaml(tmp_path, [{**ENTRY, **change}])
    with pytest.raises(EvalDataError) as info:
        load_eval_config(path)
    assert str(path) in str(info.value) and "datasets[0]" in str(info.value) and message in str(info.value)


def test_bad_yaml_structure(tmp_path):
    entry = dict(ENTRY)
    del entry["cfg_scale"]
    with pytest.raises(EvalDataError, match="missing key\\(s\\) cfg_scale"):
        load_eval_config(_write_yaml(tmp_path, [entry]))
    with pytest.raises(EvalDataError, match="names must be unique; repeated: bench"):
        load_eval_config(_write_yaml(tmp_path, [ENTRY, ENTRY]))
    (tmp_path / "eval.yaml").write_text("datasets: {name: x}\n")
    with pytest.raises(EvalDataError, match="top-level 'datasets:' list"):
        load_eval_config(tmp_path / "eval.yaml")
    (tmp_path / "eval.yaml").write_text("datasets: [\n")
    with pytest.raises(EvalDataError, match="not valid YAML"):
        load_eval_config(tmp_path / "eval.yaml")
    with pytest.raises(EvalDataError, match="--eval_dataset_config"):
        load_eval_config(tmp_path / "missing.yaml")

"""Eval YAML and UniGenBench CSV -> typed records (docs/upstream_compatibility.md#eval-yaml-and-unigenbench-csv).

Eval YAML (``assets/rl_datasets/deepgen/eval/eval.yaml``)::

    datasets:
      - name: unigenbench_en
        path: unigenbench/test_prompts_en.csv      # relative to the YAML's folder
        cfg_scale: 4.0
        num_inference_steps: 50
        duplicates: 4                              # images generated (and judged) per prompt
        scoring: unigenbench/en                    # unigenbench[/en|/zh]: the judge prompt's language
      - {name: my_edits, path: edits/edits.jsonl, cfg_scale: 4.0, num_inference_steps: 50, duplicates: 1,
         scoring: edit_judge}                      # an edit JSONL scored by the edit VLM judge (eval/edit_eval.py)

UniGenBench CSV: columns ``index,prompt,sub_dims``; ``sub_dims`` is JSON. The English file names its keys
``Primary Categories``, ``Secondary Categories``, ``Testpoints``, ``Testpoint Description``; the Chinese file
uses ``一级垂类``, ``二级垂类``, ``考点``, ``考点对应描述`` (the reference reads only the English keys, so its
Chinese evaluation scores nothing; we accept both). A test point's primary dimension is its name before the
first separator: " - " in English (``Attribute - Quantity`` -> ``Attribute``), "-" in Chinese
(``属性-数量`` -> ``属性``); names without one are their own dimension (``Style``).

Every problem raises :class:`EvalDataError` naming the file, the row (CSV line) and the key.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

Language = Literal["en", "zh"]
EDIT_SCORING = "edit_judge"  # an edit JSONL (data/edit_prompts.py) judged by the edit VLM judge
SCORING_LANGUAGES: dict[str, Language] = {"unigenbench": "en", "unigenbench/en": "en", "unigenbench/zh": "zh",
                                          EDIT_SCORING: "en"}
PRIMARY_SEPARATORS: dict[str, str] = {"en": " - ", "zh": "-"}
CSV_COLUMNS = ("index", "prompt", "sub_dims")
DATASET_KEYS = ("name", "path", "cfg_scale", "num_inference_steps", "duplicates", "scoring")
# sub_dims key aliases: (English file, Chinese file).
TEST_POINTS_KEYS = ("Testpoints", "考点")
DESCRIPTIONS_KEYS = ("Testpoint Description", "考点对应描述")
PRIMARY_KEYS = ("Primary Categories", "一级垂类")
SECONDARY_KEYS = ("Secondary Categories", "二级垂类")


class EvalDataError(ValueError):
    """A malformed eval YAML or UniGenBench CSV; the message names the file, row and key."""


@dataclass(frozen=True)
class EvalDatasetSpec:
    """One entry of the eval YAML; ``path`` is resolved against the YAML's folder."""

    name: str
    path: Path
    cfg_scale: float
    num_inference_steps: int
    duplicates: int
    scoring: str
    language: Language


@dataclass(frozen=True)
class BenchPrompt:
    """One UniGenBench row. ``test_points[j]`` is checked against ``test_point_descriptions[j]``."""

    index: int
    prompt: str
    primary_category: str
    secondary_category: str
    test_points: tuple[str, ...]
    test_point_descriptions: tuple[str, ...]


def primary_dimension(test_point: str, language: Language) -> str:
    """The dimension a test point counts toward: its name before the first separator (whole name if none)."""
    return test_point.split(PRIMARY_SEPARATORS[language], 1)[0].strip()


# ---- eval YAML ----

def load_eval_config(path: str | Path) -> list[EvalDatasetSpec]:
    """Parse the eval YAML into dataset specs (paths resolved, CSVs not read yet)."""
    yaml_path = Path(path)
    if not yaml_path.is_file():
        raise EvalDataError(f"eval dataset config {yaml_path} does not exist: set --eval_dataset_config (or "
                            "EVAL_DATASET_CONFIG) to an eval YAML such as assets/rl_datasets/deepgen/eval/eval.yaml.")
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise EvalDataError(f"{yaml_path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise EvalDataError(f"{yaml_path}: expected a top-level 'datasets:' list with at least one entry.")
    specs = [_parse_dataset_entry(yaml_path, i, entry) for i, entry in enumerate(data["datasets"])]
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise EvalDataError(f"{yaml_path}: dataset names must be unique; repeated: {', '.join(duplicated)}.")
    return specs


def _parse_dataset_entry(yaml_path: Path, position: int, entry: Any) -> EvalDatasetSpec:
    where = f"{yaml_path}: datasets[{position}]"
    if not isinstance(entry, dict):
        raise EvalDataError(f"{where}: expected a mapping with keys {', '.join(DATASET_KEYS)}; got {entry!r}.")
    unknown = sorted(set(entry) - set(DATASET_KEYS))
    if unknown:
        raise EvalDataError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                            f"allowed: {', '.join(DATASET_KEYS)}.")
    missing = [key for key in DATASET_KEYS if key not in entry]
    if missing:
        raise EvalDataError(f"{where}: missing key(s) {', '.join(missing)} (the reference uses cfg_scale: 4.0, "
                            "num_inference_steps: 50, duplicates: 4, scoring: unigenbench/en).")
    name = _typed(where, entry, "name", str)
    where = f"{yaml_path}: datasets[{position}] ({name})"
    scoring = _typed(where, entry, "scoring", str)
    if scoring not in SCORING_LANGUAGES:
        raise EvalDataError(f"{where}: key 'scoring' must be one of {', '.join(SCORING_LANGUAGES)}; got {scoring!r}.")
    cfg_scale = float(_typed(where, entry, "cfg_scale", (int, float)))
    steps = _typed(where, entry, "num_inference_steps", int)
    duplicates = _typed(where, entry, "duplicates", int)
    if cfg_scale < 0:
        raise EvalDataError(f"{where}: key 'cfg_scale' must be >= 0 (0 disables CFG); got {cfg_scale}.")
    for key, value in (("num_inference_steps", steps), ("duplicates", duplicates)):
        if value < 1:
            raise EvalDataError(f"{where}: key '{key}' must be a positive integer; got {value}.")
    return EvalDatasetSpec(
        name=name, path=(yaml_path.parent / _typed(where, entry, "path", str)).resolve(), cfg_scale=cfg_scale,
        num_inference_steps=steps, duplicates=duplicates, scoring=scoring, language=SCORING_LANGUAGES[scoring],
    )


def _typed(where: str, entry: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"{where}: key '{key}' must be {names}; got {value!r}.")
    return value


# ---- UniGenBench CSV ----

def load_unigenbench_csv(path: str | Path) -> list[BenchPrompt]:
    """Parse a UniGenBench CSV (English or Chinese keys) into prompts, in file order."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise EvalDataError(f"UniGenBench CSV {csv_path} does not exist: fix 'path' in the eval YAML (it is "
                            "relative to the YAML's folder).")
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise EvalDataError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header must be "
                                f"{','.join(CSV_COLUMNS)} (found {reader.fieldnames}).")
        prompts = [_parse_row(csv_path, reader.line_num, row) for row in reader]
    if not prompts:
        raise EvalDataError(f"{csv_path}: no prompt rows.")
    seen: dict[int, int] = {}
    for position, prompt in enumerate(prompts):
        if prompt.index in seen:
            raise EvalDataError(f"{csv_path}: column 'index' value {prompt.index} appears twice (data rows "
                                f"{seen[prompt.index] + 1} and {position + 1}).")
        seen[prompt.index] = position
    return prompts


def _parse_row(csv_path: Path, line: int, row: dict[str, Any]) -> BenchPrompt:
    where = f"{csv_path}: line {line}"
    if None in row:  # more cells than header columns: usually an unquoted comma in the prompt
        raise EvalDataError(f"{where}: more cells than the {len(CSV_COLUMNS)} columns {','.join(CSV_COLUMNS)} "
                            "(quote prompts that contain commas).")
    try:
        index = int(str(row["index"]).strip())
    except (TypeError, ValueError):
        raise EvalDataError(f"{where}: column 'index' must be an integer; got {row['index']!r}.") from None
    where = f"{where} (index {index})"
    prompt = (row["prompt"] or "").strip()
    if not prompt:
        raise EvalDataError(f"{where}: column 'prompt' is empty.")
    try:
        sub_dims = json.loads(row["sub_dims"] or "")
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{where}: column 'sub_dims' is not valid JSON ({err.msg} at char {err.pos}).") from None
    if not isinstance(sub_dims, dict):
        raise EvalDataError(f"{where}: column 'sub_dims' must be a JSON object; got {type(sub_dims).__name__}.")
    test_points = _string_list(where, sub_dims, TEST_POINTS_KEYS, allow_empty=False)
    # The real English file has empty descriptions (e.g. index 382): the test point name still says what to check.
    descriptions = _string_list(where, sub_dims, DESCRIPTIONS_KEYS, allow_empty=True)
    if not test_points:
        raise EvalDataError(f"{where}: sub_dims key '{_present_key(sub_dims, TEST_POINTS_KEYS)}' is empty.")
    if len(test_points) != len(descriptions):
        raise EvalDataError(
            f"{where}: sub_dims has {len(test_points)} test points ('{_present_key(sub_dims, TEST_POINTS_KEYS)}') "
            f"but {len(descriptions)} descriptions ('{_present_key(sub_dims, DESCRIPTIONS_KEYS)}'); they pair up "
            "one to one.")
    return BenchPrompt(
        index=index, prompt=prompt,
        primary_category=_optional_string(where, sub_dims, PRIMARY_KEYS),
        secondary_category=_optional_string(where, sub_dims, SECONDARY_KEYS),
        test_points=tuple(test_points), test_point_descriptions=tuple(descriptions),
    )


def _present_key(sub_dims: dict, aliases: tuple[str, ...]) -> str:
    return next((key for key in aliases if key in sub_dims), aliases[0])


def _string_list(where: str, sub_dims: dict, aliases: tuple[str, ...], allow_empty: bool) -> list[str]:
    key = _present_key(sub_dims, aliases)
    if key not in sub_dims:
        raise EvalDataError(f"{where}: sub_dims has no key {' or '.join(repr(a) for a in aliases)} "
                            f"(found keys: {', '.join(sub_dims) or 'none'}).")
    value = sub_dims[key]
    if not isinstance(value, list) or not all(isinstance(item, str) and (allow_empty or item.strip())
                                              for item in value):
        what = "strings" if allow_empty else "non-empty strings"
        raise EvalDataError(f"{where}: sub_dims key '{key}' must be a list of {what}; got {value!r}.")
    return [item.strip() for item in value]


def _optional_string(where: str, sub_dims: dict, aliases: tuple[str, ...]) -> str:
    key = _present_key(sub_dims, aliases)
    value = sub_dims.get(key, "")
    if not isinstance(value, str):
        raise EvalDataError(f"{where}: sub_dims key '{key}' must be a string; got {value!r}.")
    return value.strip()


# ---- both together ----

@dataclass(frozen=True)
class EvalDataset:
    """An eval YAML entry with its prompts (the first ``max_prompts`` of the CSV when that limit is set)."""

    spec: EvalDatasetSpec
    prompts: tuple[BenchPrompt, ...]


def load_eval_datasets(config_path: str | Path, max_prompts: int = 0) -> list[EvalDataset]:
    """Read the eval YAML and every CSV it names; ``max_prompts`` > 0 keeps the first N prompts of each. Edit
    entries (``scoring: edit_judge``) are left to eval/edit_eval.py."""
    if max_prompts < 0:
        raise ValueError(f"--eval_max_prompts must be >= 0 (0: all prompts); got {max_prompts}.")
    datasets = []
    for spec in load_eval_config(config_path):
        if spec.scoring == EDIT_SCORING:
            continue
        prompts = load_unigenbench_csv(spec.path)
        datasets.append(EvalDataset(spec=spec, prompts=tuple(prompts[:max_prompts] if max_prompts else prompts)))
    return datasets

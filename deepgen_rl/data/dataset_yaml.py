"""The training dataset YAML -> typed config (format of the DeepGen-RL reference,
docs/upstream_compatibility.md#dataset-yaml).

    sampling_mode: sample_proportional        # or weight_only (optional; sample_proportional by default)
    datasets:
      - name: text_render                     # unique
        path: prompts/text_render.txt         # relative to this YAML (absolute paths allowed); one prompt a line,
                                              # or an edit JSONL (``.jsonl``, data/edit_prompts.py)
        sample_weight: 3.0                    # > 0
        rewards:                              # reward name -> weight in the advantage (>= 0)
          - ocr: 0.7
          - unifiedreward_think: 0.3

``sample_proportional``: P(dataset d) is proportional to sample_weight_d * size_d (weight 2 = twice as likely as
uniform sampling over all prompts); ``weight_only``: proportional to sample_weight_d alone.

Loading the YAML checks its structure only (every error names the file and the key, e.g.
``deepgen_train.yaml: datasets[2].rewards[0]: ...``); prompt files are read later, when prompts are needed
(``PromptDataset``), and a missing one fails then, naming the file. ``validate_paths=True`` checks them all
up front. This lets a config that lists datasets you do not have (the reference's) be parsed and inspected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Literal, Mapping, Optional, Union, get_args

import yaml

from deepgen_rl.rewards.names import EDIT_ONLY_REWARDS, REWARD_NAMES

SamplingMode = Literal["sample_proportional", "weight_only"]
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)


class DatasetConfigError(ValueError):
    """A dataset YAML is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class DatasetEntry:
    """One prompt dataset: ``rewards`` maps reward name -> weight (read-only, in YAML order)."""

    name: str
    path: Path
    sample_weight: float
    rewards: Mapping[str, float]

    @property
    def is_edit(self) -> bool:
        """An edit dataset (a JSONL of instructions with source images) rather than a text-to-image prompt file."""
        return self.path.suffix == ".jsonl"


@dataclass(frozen=True)
class DatasetConfig:
    source: Path
    sampling_mode: SamplingMode
    datasets: tuple[DatasetEntry, ...]

    @property
    def reward_names(self) -> tuple[str, ...]:
        """Every reward any dataset uses, in first-seen order (the reward step's columns)."""
        return tuple(dict.fromkeys(name for entry in self.datasets for name in entry.rewards))

    def missing_files(self) -> list[Path]:
        return [entry.path for entry in self.datasets if not entry.path.is_file()]

    def only(self, names: Collection[str]) -> "DatasetConfig":
        """The same config restricted to ``names`` (e.g. the datasets present on this machine)."""
        unknown = sorted(set(names) - {entry.name for entry in self.datasets})
        if unknown:
            raise DatasetConfigError(f"{self.source}: no dataset named {unknown}")
        kept = tuple(entry for entry in self.datasets if entry.name in names)
        return DatasetConfig(self.source, self.sampling_mode, kept)


def _fail(source: Path, key: str, message: str) -> DatasetConfigError:
    return DatasetConfigError(f"{source}: {key}: {message}")


def read_yaml_mapping(path: Union[str, Path]) -> tuple[Path, dict]:
    """Read a YAML file whose top level must be a mapping; errors name the file."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise DatasetConfigError(f"dataset config {source} does not exist (set --dataset_config / DATASET_CONFIG).")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DatasetConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise _fail(source, "<top level>", f"expected a mapping with a 'datasets' list, got {type(data).__name__}")
    return source, data


def number(source: Path, key: str, value: Any, *, minimum: float, strict: bool) -> float:
    """A YAML number >= (or > when strict) ``minimum``; bools are rejected (YAML reads 'yes' as True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, key, f"must be a number, got {value!r}")
    if (value <= minimum) if strict else (value < minimum):
        raise _fail(source, key, f"must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def resolve_path(source: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, key, f"must be a file path (relative to the YAML), got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (source.parent / path).resolve()


def _parse_rewards(source: Path, key: str, value: Any, known: Optional[Collection[str]]) -> Mapping[str, float]:
    if not isinstance(value, list) or not value:
        raise _fail(source, key, "must be a non-empty list of {reward_name: weight} entries")
    rewards: dict[str, float] = {}
    for j, item in enumerate(value):
        item_key = f"{key}[{j}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise _fail(source, item_key, f"must be one {{reward_name: weight}} mapping, got {item!r}")
        (name, weight), = item.items()
        if known is not None and name not in known:
            raise _fail(source, item_key, f"unknown reward {name!r}; available: {', '.join(known)}")
        if name in rewards:
            raise _fail(source, item_key, f"reward {name!r} is listed twice")
        rewards[str(name)] = number(source, f"{item_key}.{name}", weight, minimum=0.0, strict=False)
    if not any(weight > 0 for weight in rewards.values()):
        raise _fail(source, key, "every reward weight is 0; at least one must be > 0")
    return MappingProxyType(rewards)


def _parse_entry(source: Path, index: int, raw: Any, known: Optional[Collection[str]]) -> DatasetEntry:
    key = f"datasets[{index}]"
    if not isinstance(raw, dict):
        raise _fail(source, key, f"must be a mapping with name, path, sample_weight, rewards; got {raw!r}")
    allowed = {"name", "path", "sample_weight", "rewards"}
    for field_name in allowed - {"sample_weight"}:
        if field_name not in raw:
            raise _fail(source, f"{key}.{field_name}", "missing (required)")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise _fail(source, f"{key}.{extra[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise _fail(source, f"{key}.name", f"must be a non-empty string, got {name!r}")
    entry = DatasetEntry(
        name=name,
        path=resolve_path(source, f"{key}.path", raw["path"]),
        sample_weight=number(source, f"{key}.sample_weight", raw.get("sample_weight", 1.0), minimum=0.0, strict=True),
        rewards=_parse_rewards(source, f"{key}.rewards", raw["rewards"], known),
    )
    edit_only = [reward for reward in entry.rewards if reward in EDIT_ONLY_REWARDS]
    if edit_only and not entry.is_edit:
        raise _fail(source, f"{key}.rewards", f"{', '.join(edit_only)} compare the result with source images, which "
                                              f"only edit datasets have (a .jsonl path); {entry.path.name} is a "
                                              "text-to-image prompt file")
    return entry


def load_dataset_config(path: Union[str, Path], known_rewards: Optional[Collection[str]] = REWARD_NAMES,
                        validate_paths: bool = False) -> DatasetConfig:
    """Parse and validate a training dataset YAML.

    known_rewards: reward names that exist (default: the reward registry's); None skips that check.
    validate_paths: also require every prompt file to exist (else they are checked when read).
    """
    source, data = read_yaml_mapping(path)
    extra = sorted(set(data) - {"sampling_mode", "datasets"})
    if extra:
        raise _fail(source, extra[0], "unknown top-level key; allowed: sampling_mode, datasets")
    mode = data.get("sampling_mode", "sample_proportional")
    if mode not in SAMPLING_MODES:
        raise _fail(source, "sampling_mode", f"must be one of {', '.join(SAMPLING_MODES)}, got {mode!r}")
    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise _fail(source, "datasets", "must be a non-empty list")
    entries = tuple(_parse_entry(source, i, raw, known_rewards) for i, raw in enumerate(raw_datasets))
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.name in seen:
            raise _fail(source, f"datasets[{i}].name", f"duplicate dataset name {entry.name!r}")
        seen.add(entry.name)
    config = DatasetConfig(source=source, sampling_mode=mode, datasets=entries)
    if validate_paths:
        missing = config.missing_files()
        if missing:
            raise DatasetConfigError(f"{source}: prompt file(s) not found: {', '.join(map(str, missing))}")
    return config

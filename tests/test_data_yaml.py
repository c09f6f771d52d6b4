"""Dataset YAMLs: the shipped ones, the real reference one, bad ones, and the seeded resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepgen_rl.data import DatasetConfigError, PromptSampler, dataset_probabilities, load_dataset_config
from deepgen_rl.rewards import REWARD_NAMES
from deepgen_rl.rewards.ocr_scoring import extract_targets

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "rl_datasets"
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference-data"


def write(tmp_path: Path, text: str, prompts: dict[str, str] | None = None) -> Path:
    for name, content in (prompts or {}).items():
        (tmp_path / name).write_text(content)
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


# ---------- shipped configs ----------

def test_shipped_training_yaml_loads_with_every_prompt_file():
    config = load_dataset_config(ASSETS / "deepgen" / "deepgen_train.yaml", validate_paths=True)
    assert config.sampling_mode == "sample_proportional"
    assert set(config.reward_names) == {"ocr", "unifiedreward_think", "clip_sim"}
    sampler = PromptSampler(config, seed=0)
    assert all(size >= 20 for size in sampler.sizes)
    for dataset in sampler.datasets:
        if "ocr" in dataset.entry.rewards:  # every OCR prompt must carry a quoted target
            assert all(extract_targets(prompt) for prompt in dataset.prompts), dataset.entry.name
    assert sum(config.datasets[0].rewards.values()) == pytest.approx(1.0)


def test_quickstart_yaml_uses_only_the_local_reward():
    config = load_dataset_config(ASSETS / "quickstart" / "quickstart.yaml", validate_paths=True)
    assert config.reward_names == ("jpeg_compressibility",)
    batch = PromptSampler(config, seed=3).sample(5)
    assert all(sample.reward_weights == {"jpeg_compressibility": 1.0} for sample in batch)


def test_shipped_eval_yaml_and_our_unigenbench_sample():
    from deepgen_rl.eval.dataset import load_eval_config, load_unigenbench_csv

    (entry,) = load_eval_config(ASSETS / "deepgen" / "eval" / "eval.yaml")
    assert (entry.cfg_scale, entry.num_inference_steps, entry.duplicates, entry.scoring) == (4.0, 50, 4, "unigenbench/en")
    assert entry.path == ASSETS / "deepgen" / "eval" / "unigenbench" / "test_prompts_en.csv"
    rows = load_unigenbench_csv(entry.path)
    assert len(rows) == 12 and [row.index for row in rows] == list(range(12))
    assert all(len(row.test_points) == len(row.test_point_descriptions) >= 1 for row in rows)


# ---------- the real reference files ----------

@pytest.fixture
def reference_yaml() -> Path:
    path = REFERENCE / "deepgen_train.yaml"
    if not path.is_file():
        pytest.skip(f"reference data {path} is absent (only on the team's machines)")
    return path


def test_real_reference_yaml_loads(reference_yaml):
    config = load_dataset_config(reference_yaml)
    assert [e.name for e in config.datasets][:2] == ["unigenbench_train_data_ocr", "qwenimage_textrender"]
    assert dict(config.datasets[0].rewards) == {"unifiedreward_think": 0.2, "clip_sim": 0.1, "ocr": 0.7}
    assert config.datasets[0].path.resolve() == (reference_yaml.parent / "unigenbench_train_data_ocr.txt").resolve()


def test_real_reference_yaml_missing_prompt_files_are_named(reference_yaml):
    config = load_dataset_config(reference_yaml)
    missing = config.missing_files()
    if not missing:
        pytest.skip("every prompt file of the reference YAML is present here")
    with pytest.raises(FileNotFoundError, match=missing[0].name):
        PromptSampler(config, seed=0)
    with pytest.raises(DatasetConfigError, match=missing[0].name):
        load_dataset_config(reference_yaml, validate_paths=True)
    present = [e.name for e in config.datasets if e.path.is_file()]
    sampler = PromptSampler(config.only(present), seed=0)
    samples = sampler.sample(8)
    assert {s.dataset for s in samples} <= set(present)
    for sample in samples:
        if sample.dataset == "unigenbench_train_data_ocr":
            assert extract_targets(sample.prompt) and sample.reward_weights["ocr"] == 0.7


# ---------- bad YAML: the error names the file and the key ----------

GOOD_ENTRY = "  - name: a\n    path: a.txt\n    sample_weight: 1.0\n    rewards:\n      - ocr: 1.0\n"


@pytest.mark.parametrize("text, key, message", [
    ("sampling_mode: weighted\ndatasets:\n" + GOOD_ENTRY, "sampling_mode", "must be one of"),
    ("sampling_mode: weight_only\n", "datasets", "non-empty list"),
    ("datasets:\n  - name: a\n    sample_weight: 1.0\n    rewards:\n      - ocr: 1.0\n", "datasets[0].path", "missing"),
    ("datasets:\n  - name: a\n    path: a.txt\n    sample_weight: -2\n    rewards:\n      - ocr: 1.0\n",
     "datasets[0].sample_weight", "must be >"),
    ("datasets:\n  - name: a\n    path: a.txt\n    rewards:\n      - laion_aesthetic: 1.0\n", "datasets[0].rewards[0]",
     "unknown reward 'laion_aesthetic'"),
    ("datasets:\n  - name: a\n    path: a.txt\n    rewards:\n      - ocr: yes\n", "datasets[0].rewards[0].ocr",
     "must be a number"),
    ("datasets:\n  - name: a\n    path: a.txt\n    rewards:\n      - ocr\n", "datasets[0].rewards[0]",
     "one {reward_name: weight}"),
    ("datasets:\n  - name: a\n    path: a.txt\n    rewards:\n      - ocr: 0\n", "datasets[0].rewards", "every reward weight is 0"),
    ("datasets:\n" + GOOD_ENTRY + GOOD_ENTRY, "datasets[1].name", "duplicate"),
    ("datasets:\n  - name: a\n    path: a.txt\n    weight: 1\n    rewards:\n      - ocr: 1\n", "datasets[0].weight",
     "unknown key"),
    ("datasets: [\n", "", "not valid YAML"),
    ("- just\n- a list\n", "<top level>", "expected a mapping"),
])
def test_bad_yaml_names_file_and_key(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(DatasetConfigError) as err:
        load_dataset_config(path, known_rewards=REWARD_NAMES)
    assert str(path) in str(err.value)
    assert f": {key}: " in str(err.value) if key else True
    assert message in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(DatasetConfigError, match="nope.yaml.*DATASET_CONFIG"):
        load_dataset_config(tmp_path / "nope.yaml")


# ---------- sampling ----------

TWO_DATASETS = """sampling_mode: {mode}
datasets:
  - name: small
    path: small.txt
    sample_weight: 3.0
    rewards:
      - ocr: 0.7
      - clip_sim: 0.3
  - name: big
    path: sub/big.txt
    sample_weight: 1.0
    rewards:
      - unifiedreward_think: 1.0
"""


@pytest.fixture
def two_datasets(tmp_path):
    (tmp_path / "sub").mkdir()

    def make(mode: str, big_size: int = 6):
        prompts = {"small.txt": 'one "A"\n\ntwo "B"\n',
                   "sub/big.txt": "".join(f"prompt {i}\n" for i in range(big_size))}
        return load_dataset_config(write(tmp_path, TWO_DATASETS.format(mode=mode), prompts), validate_paths=True)

    return make


@pytest.mark.parametrize("mode, expected", [
    ("sample_proportional", [0.5, 0.5]),   # 3 x 2 prompts vs 1 x 6 prompts
    ("weight_only", [0.75, 0.25]),         # 3 vs 1
])
def test_dataset_probabilities_hand_worked(two_datasets, mode, expected):
    config = two_datasets(mode)
    assert dataset_probabilities(config, [2, 6]) == pytest.approx(expected)
    sampler = PromptSampler(config, seed=0)
    draws = [s.dataset for _ in range(40) for s in sampler.sample(100)]
    share = draws.count("small") / len(draws)
    sigma = np.sqrt(expected[0] * (1 - expected[0]) / len(draws))
    assert abs(share - expected[0]) < 5 * sigma


def test_samples_carry_their_dataset_and_reward_weights(two_datasets):
    sampler = PromptSampler(two_datasets("sample_proportional"), seed=1)
    for sample in sampler.sample(50):
        if sample.dataset == "small":
            assert sample.prompt in ('one "A"', 'two "B"')  # blank line skipped
            assert dict(sample.reward_weights) == {"ocr": 0.7, "clip_sim": 0.3}
        else:
            assert sample.prompt == f"prompt {sample.index}"
            assert dict(sample.reward_weights) == {"unifiedreward_think": 1.0}


def test_sampler_resumes_the_exact_sequence_and_ranks_differ(two_datasets):
    config = two_datasets("sample_proportional")
    first = PromptSampler(config, seed=7)
    batches = [first.sample(6) for _ in range(3)]
    resumed = PromptSampler(config, seed=123)
    state = PromptSampler(config, seed=7)
    state.sample(6)
    resumed.load_state_dict(state.state_dict())
    assert [resumed.sample(6), resumed.sample(6)] == batches[1:]
    other_rank = PromptSampler(config, seed=7, rank=1)
    assert [other_rank.sample(6) for _ in range(3)] != batches


def test_resuming_with_a_different_config_is_refused(two_datasets):
    state = PromptSampler(two_datasets("sample_proportional"), seed=0).state_dict()
    changed = PromptSampler(two_datasets("sample_proportional", big_size=1), seed=0)
    with pytest.raises(ValueError, match="sizes"):
        changed.load_state_dict(state)

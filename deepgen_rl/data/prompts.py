"""Prompt datasets of a dataset YAML and the seeded, resumable sampler that draws training prompts.

Each drawn ``PromptSample`` carries its dataset's name and reward weights, so the reward step knows which
rewards to compute for it and with which weight.

Sampling (docs/upstream_compatibility.md#dataset-yaml): a dataset is drawn with probability

    sample_proportional:  p_d = w_d n_d / sum_e w_e n_e       weight_only:  p_d = w_d / sum_e w_e

(w = sample_weight, n = number of prompts), then a prompt uniformly within it, with replacement. Batch b is one
list of prompts for the WHOLE run: its prompt i (global index) comes from its own generator seeded by
(seed, b, i), and rank r of a run drawing n prompts per rank takes the prompts r*n .. r*n + n - 1. So any number
of ranks sharing the same global batch draws the same prompts (docs/reproducibility.md), a rank draws only its own
(the cost does not grow with the world size), and the sampler's whole state is the number of batches drawn:
resuming from a checkpoint continues the exact sequence, on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from deepgen_rl.data.dataset_yaml import DatasetConfig, DatasetEntry
from deepgen_rl.data.edit_prompts import EditPrompt, read_edit_file
from deepgen_rl.core.distributed import numpy_rng


@dataclass(frozen=True)
class PromptSample:
    prompt: str
    dataset: str
    reward_weights: Mapping[str, float]
    index: int  # line of the prompt in its dataset (0-based, blank lines skipped)
    # Edit datasets only (data/edit_prompts.py): prompt is the instruction; the first source is the edited image.
    source_images: tuple[Path, ...] = ()
    target_text: Optional[str] = None

    @property
    def is_edit(self) -> bool:
        return bool(self.source_images)


def read_prompt_file(path: Path, dataset: str, config_source: Optional[Path] = None) -> list[str]:
    """One prompt per non-blank line (surrounding whitespace stripped). Errors name the file and the dataset."""
    where = f" (dataset {dataset!r} of {config_source})" if config_source else f" (dataset {dataset!r})"
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found{where}: fix its 'path' (relative to the YAML) "
                                "or remove the dataset from the config.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts{where}.")
    return prompts


class PromptDataset:
    """The prompts of one dataset entry, read on first use."""

    def __init__(self, entry: DatasetEntry, config_source: Optional[Path] = None) -> None:
        self.entry = entry
        self._config_source = config_source
        self._prompts: Optional[list[str]] = None
        self._edits: Optional[list[EditPrompt]] = None

    @property
    def prompts(self) -> list[str]:
        """The prompts (of an edit dataset: its instructions)."""
        if self._prompts is None:
            if self.entry.is_edit:
                self._edits = read_edit_file(self.entry.path, self.entry.name)
                self._prompts = [edit.instruction for edit in self._edits]
            else:
                self._prompts = read_prompt_file(self.entry.path, self.entry.name, self._config_source)
        return self._prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> PromptSample:
        sample = PromptSample(self.prompts[index], self.entry.name, self.entry.rewards, index)
        if self._edits is None:
            return sample
        edit = self._edits[index]
        return replace(sample, source_images=edit.source_images, target_text=edit.target_text)


def dataset_probabilities(config: DatasetConfig, sizes: Sequence[int]) -> np.ndarray:
    """[D] probability of drawing each dataset (see the module docstring)."""
    weights = np.array([entry.sample_weight for entry in config.datasets], dtype=np.float64)
    if config.sampling_mode == "sample_proportional":
        weights = weights * np.asarray(sizes, dtype=np.float64)
    return weights / weights.sum()


class PromptSampler:
    """Draws batches of prompts from every dataset of a config (reads all their prompt files at construction)."""

    def __init__(self, config: DatasetConfig, seed: int, rank: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        self.rank = int(rank)
        self.datasets = [PromptDataset(entry, config.source) for entry in config.datasets]
        missing = config.missing_files()
        if missing:
            raise FileNotFoundError(f"{config.source}: prompt file(s) not found: {', '.join(map(str, missing))}. "
                                    "Fix their 'path' (relative to the YAML) or remove those datasets.")
        self.sizes = [len(dataset) for dataset in self.datasets]
        self.probabilities = dataset_probabilities(config, self.sizes)
        self.batches_drawn = 0

    def sample(self, batch_size: int) -> list[PromptSample]:
        """This rank's next ``batch_size`` prompts (with replacement): the global prompts rank*batch_size ..
        rank*batch_size + batch_size - 1 of the next batch."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        batch, first = self.batches_drawn, self.rank * batch_size
        self.batches_drawn += 1
        return [self._draw(batch, first + i) for i in range(batch_size)]

    def _draw(self, batch: int, index: int) -> PromptSample:
        """Prompt ``index`` of batch ``batch``: a dataset by ``probabilities``, then a prompt uniformly within it."""
        rng = numpy_rng(self.seed, batch, index)
        dataset = int(rng.choice(len(self.datasets), p=self.probabilities))
        return self.datasets[dataset][int(rng.integers(self.sizes[dataset]))]

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the exact prompt sequence."""
        return {"seed": self.seed, "rank": self.rank, "batches_drawn": self.batches_drawn,
                "datasets": [entry.name for entry in self.config.datasets], "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        expected = {"datasets": [entry.name for entry in self.config.datasets], "sizes": list(self.sizes)}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"prompt sampler checkpoint was saved with {key}={state.get(key)!r}, but the "
                                 f"current dataset config {self.config.source} has {value!r}; resuming would draw "
                                 "a different prompt sequence.")
        # The rank stays this process's own: every rank resumes the same seed and batch count.
        self.seed = int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])

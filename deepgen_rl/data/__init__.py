"""Training datasets: the dataset YAML -> prompt datasets carrying per-dataset reward weights, and the sampler.

(The evaluation YAML and UniGenBench CSV are read by ``deepgen_rl.eval.dataset``.)
"""

from deepgen_rl.data.dataset_yaml import DatasetConfig, DatasetConfigError, DatasetEntry, load_dataset_config
from deepgen_rl.data.prompts import PromptDataset, PromptSample, PromptSampler, dataset_probabilities

__all__ = [
    "DatasetConfig",
    "DatasetConfigError",
    "DatasetEntry",
    "PromptDataset",
    "PromptSample",
    "PromptSampler",
    "dataset_probabilities",
    "load_dataset_config",
]

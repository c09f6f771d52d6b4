"""SFT-aux: the image-caption batches of the auxiliary flow-matching loss (mmengine dataset config)."""

from deepgen_rl.sft.aux_data import SftAuxBatch, SftAuxDataConfigError, SftAuxDataset, SftAuxSampler, load_sftaux_config

__all__ = ["SftAuxBatch", "SftAuxDataConfigError", "SftAuxDataset", "SftAuxSampler", "load_sftaux_config"]

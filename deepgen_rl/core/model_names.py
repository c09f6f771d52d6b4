"""Names the model loaders share with the flags (``config.model_flags``) without importing them: the environment
variables of the guide that name the model folders, and the trainable module sets (``model.deepgen``'s
TRAINABLE_MODULES has one entry each; ``--trainable_modules`` takes one of them)."""

from __future__ import annotations

from typing import Literal, get_args

SD3_ENV = "SD3_5_MODEL_NAME_OR_PATH"
QWEN_ENV = "QWEN2_5_VL_MODEL_NAME_OR_PATH"
CLIP_ENV = "CLIP_MODEL_NAME_OR_PATH"
CHECKPOINT_ENV = "CHECKPOINT"

TrainableModuleSet = Literal["dit", "dit_connector", "dit_connector_llm"]
TRAINABLE_MODULE_SETS: tuple[str, ...] = get_args(TrainableModuleSet)

"""The DeepGen joint model (Qwen2.5-VL + connector + SD3.5 DiT) and its loading."""

from .checkpoint_keys import normalize_checkpoint_keys, to_reference_keys
from .connector import ConnectorConfig, ConnectorEncoder
from .deepgen import NEGATIVE_PROMPT, TRAINABLE_MODULES, DeepGenModel
from .loading import CheckpointError, ModelPathError, load_checkpoint_into, load_deepgen_model
from .meta import build_deepgen_model_on_meta

__all__ = [
    "CheckpointError", "ConnectorConfig", "ConnectorEncoder", "DeepGenModel", "ModelPathError", "NEGATIVE_PROMPT",
    "TRAINABLE_MODULES", "build_deepgen_model_on_meta", "load_checkpoint_into", "load_deepgen_model",
    "normalize_checkpoint_keys", "to_reference_keys",
]

"""Where the weights and datasets come from and which modules train: ``ModelArguments`` and ``DataArguments``
(argument groups of :func:`deepgen_rl.config.parse_args`). Model paths default to the environment variables the
guide names, read when a dataclass or the parser is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

# The folder variables and the trainable module sets are the model loaders' too: they live below both.
from ..core.model_names import (CHECKPOINT_ENV, CLIP_ENV, QWEN_ENV, SD3_ENV,  # noqa: F401 (re-exported)
                                TRAINABLE_MODULE_SETS, TrainableModuleSet)
from .flag_checks import _check_choice, _check_positive, _env_field

# The choices of each flag are its Literal type's arguments (model/deepgen.py's TRAINABLE_MODULES: one entry each).
ModelDtype = Literal["auto", "bfloat16", "float16", "float32"]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)


@dataclass
class ModelArguments:
    """Where the DeepGen weights are and which parts of the model train."""

    sd3_model_name_or_path: str = _env_field(
        SD3_ENV, "", "Local diffusers folder of the SD3.5-Medium-Kontext model (transformer/, vae/, scheduler/)."
    )
    qwen2_5_vl_model_name_or_path: str = _env_field(
        QWEN_ENV, "", "Local transformers folder of Qwen2.5-VL-3B-Instruct (config, weights, tokenizer)."
    )
    clip_model_name_or_path: str = _env_field(
        CLIP_ENV, "", "Local transformers folder of the CLIP model used by the clip_sim reward."
    )
    checkpoint: str = _env_field(
        CHECKPOINT_ENV,
        "",
        "DeepGen_Image pretraining checkpoint (.pth with the reference key names) loaded on top of the model "
        "paths. Empty with a real-size model stops the launch unless --allow_untrained_connector.",
    )
    allow_untrained_connector: bool = field(
        default=False,
        metadata={"help": "Train a real-size model without CHECKPOINT, i.e. with the connector, projectors and meta "
                  "queries at their random initialisation (refused otherwise: forgetting CHECKPOINT wastes the run)."},
    )
    num_queries: int = field(default=128, metadata={"help": "Number of learnable meta queries appended to the prompt."})
    num_fusion_layers: int = field(
        default=6,
        metadata={"help": "How many LLM hidden states (layers L-1, L-7, L-13, ...) are concatenated for the connector."},
    )
    connector_hidden_size: int = field(default=2048, metadata={"help": "Connector (SigLIP-style encoder) width."})
    connector_intermediate_size: int = field(default=11946, metadata={"help": "Connector MLP width."})
    connector_num_layers: int = field(default=6, metadata={"help": "Connector encoder layers."})
    connector_num_heads: int = field(default=32, metadata={"help": "Connector attention heads."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (longer prompts are cut)."})
    trainable_modules: TrainableModuleSet = field(
        default="dit",
        metadata={
            "help": "What GRPO updates: 'dit' (the SD3 transformer only, as the reference), 'dit_connector' "
            "(+ connector, projectors, meta queries) or 'dit_connector_llm' (+ the Qwen2.5-VL language model)."
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the DiT attention instead of its full weights (reference = adapters off)."},
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank when --use_lora."})
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha when --use_lora."})
    checkpoint_llm_lora_alpha: float = field(
        default=128.0,
        metadata={"help": "Alpha of an LLM LoRA found in CHECKPOINT (merged into the LLM weights at load; rank is read "
                  "from the tensors)."},
    )
    model_dtype: ModelDtype = field(
        default="auto",
        metadata={"help": "Weight dtype of the frozen parts and the rollout. 'auto': bfloat16 on GPU, float32 on CPU."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel of the Qwen2.5-VL model."})

    def __post_init__(self) -> None:
        for flag in ("num_queries", "num_fusion_layers", "connector_hidden_size", "connector_intermediate_size",
                     "connector_num_layers", "connector_num_heads", "max_prompt_length", "lora_rank"):
            _check_positive(flag, getattr(self, flag))
        _check_choice("trainable_modules", self.trainable_modules, TRAINABLE_MODULE_SETS)
        _check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        if self.connector_hidden_size % self.connector_num_heads:
            raise ValueError(
                f"--connector_hidden_size ({self.connector_hidden_size}) must be divisible by "
                f"--connector_num_heads ({self.connector_num_heads})."
            )


REPO_ROOT = Path(__file__).resolve().parents[2]  # deepgen_rl/config/ -> the repository
# Relative to the repository root: our shipped example data.
DATA_DEFAULTS = {
    "dataset_config": "assets/rl_datasets/deepgen/deepgen_train.yaml",
    "eval_dataset_config": "assets/rl_datasets/deepgen/eval/eval.yaml",
    "sftaux_dataset_config": "deepgen_rl/sft/configs/datasets/deepgen/t2i_grpo_moretextdata.py",
}


@dataclass
class DataArguments:
    """Training, evaluation and SFT-aux datasets."""

    dataset_config: str = _env_field(
        "DATASET_CONFIG", DATA_DEFAULTS["dataset_config"],
        "Training dataset YAML (prompts + rewards). The default is our small shipped example."
    )
    eval_dataset_config: str = _env_field(
        "EVAL_DATASET_CONFIG", DATA_DEFAULTS["eval_dataset_config"],
        "Evaluation dataset YAML (UniGenBench). The default is our small shipped example."
    )
    sftaux_dataset_config: str = _env_field(
        "SFTAUX_DATASET_CONFIG", DATA_DEFAULTS["sftaux_dataset_config"],
        "MMEngine config of the SFT-aux dataset. The default is our small shipped example.",
    )

    def __post_init__(self) -> None:
        # The defaults are repository paths: found from any working directory (e.g. `python -m deepgen_rl.eval
        # --tiny` started elsewhere), while a path the user gave is read as given.
        for name, default in DATA_DEFAULTS.items():
            value = getattr(self, name)
            if value == default and not Path(value).exists() and (REPO_ROOT / value).exists():
                setattr(self, name, str(REPO_ROOT / value))

"""deepgen_rl.config split into flag modules: the --help order its mixins produce, and the lists kept in two places."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from deepgen_rl.config.algorithm_config import AlgorithmFlags
from deepgen_rl.config import TRAINABLE_MODULE_SETS, GRPOConfig
from deepgen_rl.config.grpo_flags import ObjectiveFlags, RolloutFlags
from deepgen_rl.config.run_flags import RunFlags


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_grpo_config_fields_follow_its_mixins_in_help_order():
    """Dataclass fields come from the bases last to first; --help lists GRPOConfig's flags in this field order, so
    reordering the bases would silently reorder (and regroup) the help."""
    inherited = _names(TrainingArguments)
    expected = _names(AlgorithmFlags) + inherited + _names(RolloutFlags) + _names(ObjectiveFlags) + _names(RunFlags)
    assert _names(GRPOConfig) == expected
    assert _names(GRPOConfig)[len(_names(AlgorithmFlags)) + len(inherited)] == "rollout_n"


def test_every_trainable_module_choice_names_its_modules():
    from deepgen_rl.model.deepgen import TRAINABLE_MODULES

    assert tuple(TRAINABLE_MODULES) == TRAINABLE_MODULE_SETS

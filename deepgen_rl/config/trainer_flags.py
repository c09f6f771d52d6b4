"""The audit of the flags ``GRPOConfig`` inherits from ``transformers.TrainingArguments``, and the ``--help`` layout.

Our loop is not HF's ``Trainer``: of the ~110 inherited flags it reads the few in ``HONOURED_TRAINING_FLAGS``.
Every other one is in ``REFUSED_TRAINING_FLAGS`` with what to use instead; given a value other than its default it
stops the run at parse time (``config.parse_args``), instead of being accepted and silently ignored (e.g.
``--gradient_accumulation_steps 4`` once looked like it worked). ``tests/test_trainer_flags.py`` fails when a
transformers upgrade adds a flag that is in neither table, so each new one gets a decision.

``--help`` lists our flags first, one group per dataclass, then the honoured inherited flags; the refused ones
still parse (to be refused with their replacement) but are hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

from transformers import HfArgumentParser, TrainingArguments

# Inherited flags the GRPO loop reads (where: config.py, grpo_deepgen.py, trainer/).
HONOURED_TRAINING_FLAGS = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16",
    "gradient_checkpointing", "report_to", "run_name", "save_strategy", "save_steps", "save_on_each_node",
    "save_total_limit", "seed", "deepspeed", "resume_from_checkpoint", "ddp_timeout", "disable_tqdm", "log_level",
    "log_level_replica",
    "local_rank",  # written by launchers (deepspeed's); the rank is read from LOCAL_RANK
    "do_train",  # what the entry point always does
})

_BATCH = ("use --global_batch_size (images per rollout, i.e. per GRPO step, over all ranks) and "
          "--atrain_micro_batch_size (samples per GPU per training forward/backward); gradient accumulation is "
          "derived from them, --rollout_n, --timestep_fraction and the world size")
_OPTIMIZER = ("the optimizer is AdamW over the trainable parameters (--learning_rate, --adam_beta1/2, --adam_epsilon, "
              "--weight_decay); for another one, add an \"optimizer\" section to the --deepspeed JSON")
_LOGGING = "every step is logged to $OUTPUT_DIR/metrics.jsonl and the --report_to trackers"
_EVAL = "evaluation is UniGenBench every --eval_freq steps (--eval_dataset_config, --eval_max_prompts)"
_DATA = "prompts come from the dataset YAML's seeded sampler (--dataset_config / DATASET_CONFIG)"
_PARALLEL = "parallelism is DeepSpeed's: set it in the --deepspeed JSON (the backend follows the accelerator)"
_HUB = "nothing is uploaded: convert a checkpoint with scripts/utils/rlckpt_to_sftckpt.py and upload it yourself"
_UNUSED = "the GRPO loop has no such setting; remove the flag"
_TRACKER = "the tracker project comes from WANDB_PROJECT / SWANLAB_PROJ_NAME"

# Inherited flags the GRPO loop does not read -> what to use instead.
REFUSED_TRAINING_FLAGS: dict[str, str] = {
    "per_device_train_batch_size": _BATCH, "gradient_accumulation_steps": _BATCH, "auto_find_batch_size": _BATCH,
    "optim": _OPTIMIZER, "optim_args": _OPTIMIZER,
    "optim_target_modules": "what trains is --trainable_modules (or --use_lora)",
    "average_tokens_across_devices": "the GRPO loss is averaged over valid samples of all ranks; " + _UNUSED,
    "label_smoothing_factor": "GRPO has no labels; " + _UNUSED,
    "bf16_full_eval": "use --model_dtype", "fp16_full_eval": "use --model_dtype",
    "tf32": _UNUSED,
    "activation_checkpointing": "use --gradient_checkpointing",
    "activation_checkpointing_kwargs": "use --gradient_checkpointing (non-reentrant, fixed)",
    "gradient_checkpointing_kwargs": "use --gradient_checkpointing (non-reentrant, fixed)",
    "torch_compile": _UNUSED, "torch_compile_backend": _UNUSED, "torch_compile_mode": _UNUSED,
    "use_liger_kernel": _UNUSED, "liger_kernel_config": _UNUSED, "use_cache": _UNUSED,
    "neftune_noise_alpha": _UNUSED, "torch_empty_cache_steps": _UNUSED,
    "logging_strategy": _LOGGING, "logging_steps": _LOGGING, "logging_first_step": _LOGGING,
    "log_on_each_node": _LOGGING + " (rank 0 logs; other ranks follow --log_level_replica)",
    "logging_nan_inf_filter": "non-finite losses skip the optimizer step and are counted in the logs",
    "include_num_input_tokens_seen": _LOGGING,
    "project": _TRACKER, "trackio_space_id": _TRACKER, "trackio_bucket_id": _TRACKER,
    "trackio_static_space_id": _TRACKER,
    "eval_strategy": _EVAL, "eval_steps": _EVAL, "eval_delay": _EVAL, "per_device_eval_batch_size": _EVAL,
    "prediction_loss_only": _EVAL, "eval_on_start": _EVAL, "eval_do_concat_batches": _EVAL,
    "eval_use_gather_object": _EVAL, "eval_accumulation_steps": _EVAL, "include_for_metrics": _EVAL,
    "batch_eval_metrics": _EVAL, "do_eval": _EVAL, "do_predict": _EVAL,
    "save_only_model": "checkpoints always hold what resume needs; for weights only, convert with "
                       "scripts/utils/rlckpt_to_sftckpt.py",
    "enable_jit_checkpoint": "SIGTERM already makes the run checkpoint its last completed step (docs/cluster_training.md#a-real-run, step 6)",
    "push_to_hub": _HUB, "hub_token": _HUB, "hub_private_repo": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB,
    "hub_always_push": _HUB, "hub_revision": _HUB,
    "load_best_model_at_end": "--save_total_limit keeps the newest checkpoints; pick one by its metrics.jsonl",
    "metric_for_best_model": "--save_total_limit keeps the newest checkpoints; pick one by its metrics.jsonl",
    "greater_is_better": "--save_total_limit keeps the newest checkpoints; pick one by its metrics.jsonl",
    "ignore_data_skip": "--resume_from_checkpoint restores the prompt sampler's position exactly",
    "restore_callback_states_from_checkpoint": "there are no Trainer callbacks; " + _UNUSED,
    "full_determinism": "use --seed (every random draw is seeded from it, the step and the rank)",
    "data_seed": "use --seed (the prompt sampler is seeded from it)",
    "use_cpu": "the device follows DeepSpeed's accelerator: export DS_ACCELERATOR=cpu for a CPU run",
    "accelerator_config": _PARALLEL, "parallelism_config": _PARALLEL, "fsdp": _PARALLEL, "fsdp_config": _PARALLEL,
    "ddp_find_unused_parameters": _PARALLEL, "ddp_bucket_cap_mb": _PARALLEL, "ddp_broadcast_buffers": _PARALLEL,
    "ddp_static_graph": _PARALLEL, "ddp_backend": _PARALLEL,
    "dataloader_drop_last": _DATA, "dataloader_num_workers": _DATA, "dataloader_pin_memory": _DATA,
    "dataloader_persistent_workers": _DATA, "dataloader_prefetch_factor": _DATA,
    "dataloader_multiprocessing_context": _DATA, "dataloader_in_order": _DATA, "remove_unused_columns": _DATA,
    "label_names": _DATA, "train_sampling_strategy": _DATA, "length_column_name": _DATA,
    "debug": _UNUSED, "skip_memory_metrics": _UNUSED,
}


# Honoured inherited flags of which the loop supports only some values -> (values, what they do).
SUPPORTED_VALUES: dict[str, tuple[tuple[str, ...], str]] = {
    "save_strategy": (("steps", "no"), "'steps' checkpoints every --save_steps steps and at the end, 'no' only when "
                                       "SIGTERM stops the run"),
}


def _plain(value: Any) -> Any:
    """Enum members as their value; every "off" spelling as None: the parser turns some defaults into another one
    (``debug`` '' -> None, ``include_num_input_tokens_seen`` 'no' -> False)."""
    value = getattr(value, "value", value)
    return None if value in (None, "", "no", False) or value == [] else value


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def refused_flag_errors(parsed: argparse.Namespace, config_cls: type) -> list[str]:
    """One line per refused inherited flag of ``config_cls`` (GRPOConfig) whose parsed value differs from its
    default, and per honoured one set to a value the loop does not support.

    ``parsed`` is the parser's namespace, read BEFORE the dataclass is built: ``TrainingArguments.__post_init__``
    normalises some fields (``accelerator_config`` becomes an object, ``activation_checkpointing`` mirrors
    ``--gradient_checkpointing``), so a built config, or a ``dataclasses.replace`` of one, no longer shows what the
    user typed."""
    errors = []
    for name, (values, meaning) in SUPPORTED_VALUES.items():
        value = getattr(getattr(parsed, name), "value", getattr(parsed, name))
        if value not in values:
            errors.append(f"--{name} {value!r} is not supported by the GRPO loop: use {' or '.join(values)} "
                          f"({meaning}).")
    for field in dataclasses.fields(config_cls):
        if field.name in REFUSED_TRAINING_FLAGS and hasattr(parsed, field.name):
            value = getattr(parsed, field.name)
            if _plain(value) != _plain(_field_default(field)):
                errors.append(f"--{field.name} {getattr(value, 'value', value)!r} is not used by the GRPO loop: "
                              f"{REFUSED_TRAINING_FLAGS[field.name]}.")
    return errors


HELP_EPILOG = ("Other transformers.TrainingArguments flags (--per_device_train_batch_size, "
               "--gradient_accumulation_steps, --optim, --torch_compile, ...) are not used by the GRPO loop: given a non-default value they stop the "
               "run, naming what to use instead (deepgen_rl/config/trainer_flags.py).")


class GroupedArgumentParser(HfArgumentParser):
    """HfArgumentParser whose --help shows one group per dataclass (in the order given), then the honoured flags
    inherited from TrainingArguments; refused inherited flags parse but are hidden."""

    def __init__(self, dataclass_types, **kwargs) -> None:
        self._flag_groups: dict[str, argparse._ArgumentGroup] = {}
        super().__init__(dataclass_types, **kwargs)

    def _group(self, title: str, description: str | None = None) -> argparse._ArgumentGroup:
        if title not in self._flag_groups:
            self._flag_groups[title] = self.add_argument_group(title, description)
        return self._flag_groups[title]

    def _add_dataclass_arguments(self, dtype) -> None:
        if not self._flag_groups:  # create every group now, so --help prints them in the dataclasses' order
            for each in self.dataclass_types:
                self._group(each.__name__, (each.__doc__ or "").strip().splitlines()[0])
            self._group("Inherited from transformers.TrainingArguments (read by the GRPO loop)")
        inherited = ({f.name for f in dataclasses.fields(TrainingArguments)}
                     if issubclass(dtype, TrainingArguments) else set())
        type_hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = type_hints[field.name]
            if field.name not in inherited:
                group = self._group(dtype.__name__)
            elif field.name in HONOURED_TRAINING_FLAGS:
                group = self._group("Inherited from transformers.TrainingArguments (read by the GRPO loop)")
            else:
                group = self  # refused: parsed, then refused by config.parse_args with its replacement
            first_new = len(self._actions)
            self._parse_dataclass_field(group, field)
            if group is self:
                for action in self._actions[first_new:]:
                    action.help = argparse.SUPPRESS

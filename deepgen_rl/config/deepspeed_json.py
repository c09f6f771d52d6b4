"""Read a ``--deepspeed`` JSON and check the types of the keys we fill or DeepSpeed reads, at start-up.

DeepSpeed reads several keys without checking their type: ``"gradient_clipping": "1.0"`` passes
``deepspeed.initialize`` and crashes at the first optimizer step, after the models loaded and a rollout ran.
Checked here when the flags are parsed (preflight and every rank), each error naming the key, the value, the
expected type and the file. ``"auto"`` is accepted where ``trainer/deepspeed_setup.py`` has a rule to fill it.
Keys not listed are left to DeepSpeed's own validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Union

AUTO = "auto"


def _is_int(value: Any) -> bool:  # 5e8 is how DeepSpeed configs often write bucket sizes
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"), "number": (_is_number, "a number"), "bool": (_is_bool, "true or false"),
    "str": (_is_str, "a string"), "pair": (_is_pair, "a list of two numbers"),
}

# dotted key -> (kind, "auto" allowed). The sections' own types ("zero_optimization" an object, ...) are checked too.
KEY_TYPES: dict[str, tuple[str, bool]] = {
    "train_batch_size": ("int", True), "train_micro_batch_size_per_gpu": ("int", True),
    "gradient_accumulation_steps": ("int", True), "gradient_clipping": ("number", True),
    "steps_per_print": ("int", False), "wall_clock_breakdown": ("bool", False), "prescale_gradients": ("bool", False),
    "gradient_predivide_factor": ("number", False), "zero_allow_untested_optimizer": ("bool", False),
    "zero_force_ds_cpu_optimizer": ("bool", False),
    "bf16.enabled": ("bool", True), "fp16.enabled": ("bool", True), "fp16.loss_scale": ("number", False),
    "fp16.loss_scale_window": ("int", False), "fp16.initial_scale_power": ("int", False),
    "fp16.hysteresis": ("int", False), "fp16.min_loss_scale": ("number", False),
    "zero_optimization.stage": ("int", False), "zero_optimization.overlap_comm": ("bool", False),
    "zero_optimization.contiguous_gradients": ("bool", False), "zero_optimization.reduce_scatter": ("bool", False),
    "zero_optimization.allgather_partitions": ("bool", False),
    "zero_optimization.round_robin_gradients": ("bool", False),
    "zero_optimization.reduce_bucket_size": ("int", True), "zero_optimization.allgather_bucket_size": ("int", False),
    "zero_optimization.sub_group_size": ("int", False), "zero_optimization.stage3_prefetch_bucket_size": ("int", True),
    "zero_optimization.stage3_param_persistence_threshold": ("int", True),
    "zero_optimization.stage3_max_live_parameters": ("int", False),
    "zero_optimization.stage3_max_reuse_distance": ("int", False),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": ("bool", False),
    "zero_optimization.offload_optimizer.device": ("str", False),
    "zero_optimization.offload_optimizer.pin_memory": ("bool", False),
    "zero_optimization.offload_param.device": ("str", False),
    "zero_optimization.offload_param.pin_memory": ("bool", False),
    "optimizer.type": ("str", False), "optimizer.params.lr": ("number", True), "optimizer.params.betas": ("pair", True),
    "optimizer.params.eps": ("number", True), "optimizer.params.weight_decay": ("number", True),
    "scheduler.type": ("str", False), "scheduler.params.warmup_min_lr": ("number", True),
    "scheduler.params.warmup_max_lr": ("number", True), "scheduler.params.warmup_num_steps": ("int", True),
    "scheduler.params.total_num_steps": ("int", True),
}
SECTIONS = ("bf16", "fp16", "zero_optimization", "zero_optimization.offload_optimizer",
            "zero_optimization.offload_param", "optimizer", "optimizer.params", "scheduler", "scheduler.params")


def _lookup(config: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def deepspeed_type_errors(config: Any) -> list[str]:
    """One line per key of ``config`` whose value has the wrong type (empty when all is well)."""
    if not isinstance(config, dict):
        return [f"the top level must be a JSON object, not {type(config).__name__}"]
    errors = []
    for section in SECTIONS:
        found, value = _lookup(config, section)
        if found and not isinstance(value, dict):
            errors.append(f'"{section}" = {json.dumps(value)} must be a JSON object')
    for key, (kind, auto_ok) in KEY_TYPES.items():
        found, value = _lookup(config, key)
        check, expected = KINDS[kind]
        if not found or check(value) or (auto_ok and value == AUTO):
            continue
        errors.append(f'"{key}" = {json.dumps(value)} ({type(value).__name__}) must be {expected}'
                      + (' or "auto"' if auto_ok else ""))
    return errors


def check_deepspeed_types(config: Any, source: str) -> None:
    """Raise ValueError naming ``source`` (the --deepspeed file) and every mistyped key."""
    errors = deepspeed_type_errors(config)
    if errors:
        raise ValueError(f"--deepspeed {source}: " + "; ".join(errors) + ". Fix the JSON file (numbers and "
                         "booleans without quotes).")


def read_deepspeed_json(source: Union[str, Path]) -> dict:
    """The parsed, type-checked --deepspeed file; errors name the file and the fix."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {str(source)!r} is not a file: pass one of scripts/deepspeed/"
                                "{zero2,zero3,zero3_offload,zero3_sd3}.json or your own DeepSpeed JSON "
                                "(DEEPSPEED_CONFIG in scripts/train.sh).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed {source}: not valid JSON ({err}).") from err
    check_deepspeed_types(config, str(source))
    return config

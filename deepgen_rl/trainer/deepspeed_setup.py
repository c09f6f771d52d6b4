"""The DeepSpeed engine of the trainer: the ``--deepspeed`` JSON with its "auto" values filled, AdamW, the LR schedule.

The JSON files in scripts/deepspeed/ use the accelerate / HF Trainer convention: a value of ``"auto"`` is
filled from the flags. The batch keys are DERIVED here (from the optimizer-step schedule, see batching.py),
so an explicit number there that disagrees with the derivation is an error that says to write "auto".

The engine wraps the whole ``DeepGenModel`` (checkpoint keys are its state-dict names: ``transformer.*``,
``connector.*``, ...). The optimizer is AdamW over the trainable parameters (no weight decay on 1-D
parameters: biases and norms) unless the JSON has its own ``optimizer`` section; the schedule is
``transformers.get_scheduler(--lr_scheduler_type)`` with the warm-up of ``--warmup_steps`` /
``--warmup_ratio``, unless the JSON has a ``scheduler`` section.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import torch
from transformers import get_scheduler

from deepgen_rl.config.deepspeed_json import check_deepspeed_types, read_deepspeed_json

from .batching import BatchPlan

if TYPE_CHECKING:
    from deepgen_rl.config import GRPOConfig

logger = logging.getLogger(__name__)

AUTO = "auto"
# Used when --deepspeed is not given: ZeRO-2 as the guide's default (scripts/deepspeed/zero2.json).
DEFAULT_DEEPSPEED_CONFIG: dict[str, Any] = {
    "bf16": {"enabled": AUTO},
    "fp16": {"enabled": AUTO},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": AUTO},
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def load_deepspeed_config(source: Union[str, Path, dict, None]) -> dict:
    """--deepspeed as a path to a JSON file or an already-parsed dict, type-checked (config/deepspeed_json.py);
    None -> the built-in ZeRO-2 config."""
    if source is None or source == "":
        return copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    if isinstance(source, dict):
        check_deepspeed_types(source, "(a dict)")
        return copy.deepcopy(source)
    return read_deepspeed_json(source)


def _filler(config: dict):
    """transformers' "auto" filler (HF Trainer semantics) over a copy of ``config``. Its constructor also registers
    the config globally (from_pretrained would then build models under zero.Init): undone at once."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    filler = HfTrainerDeepSpeedConfig(config)
    unset_hf_deepspeed_config()
    return filler


def _fill_derived(filler, dotted: str, value: Any, flags: str) -> None:
    """Fill "auto" at ``dotted``; an explicit value that disagrees with the derived one is an error."""
    current = filler.get_value(dotted)
    if current not in (None, AUTO, value):
        raise ValueError(
            f"--deepspeed: {dotted} = {current!r}, but the trainer derives {value!r} from {flags}. "
            f'Write "{dotted.split(".")[-1]}": "auto" in the JSON (the value follows from the flags and the world '
            "size)."
        )
    filler.fill_only(dotted, value)


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _find_auto(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def fill_deepspeed_config(config: dict, *, args: GRPOConfig, plan: BatchPlan, num_training_steps: int, hidden_size: int,
                          trainable_dtype: torch.dtype) -> dict:
    """A copy of ``config`` with every "auto" replaced (HF Trainer semantics), from the flags and the batch plan.

    ``hidden_size``: the DiT's width (sizes ZeRO buckets as the HF integration does);
    ``trainable_dtype``: the dtype of the trained weights (bf16 weights turn "auto" bf16 on).
    """
    filler = _filler(config)
    batch_flags = ("--global_batch_size / --rollout_n / --atrain_micro_batch_size / --timestep_fraction / "
                   "--optimizer_step_schedule / --atrain_num_actor_update_steps")
    for key, value in (("train_micro_batch_size_per_gpu", plan.train_micro_batch_size),
                       ("gradient_accumulation_steps", plan.gradient_accumulation_steps),
                       ("train_batch_size", plan.deepspeed_train_batch_size)):
        _fill_derived(filler, key, value, batch_flags)
        filler.config.setdefault(key, value)
    fill = filler.fill_only
    fill("gradient_clipping", float(args.max_grad_norm or 0.0))
    fill("bf16.enabled", bool(args.bf16 or (trainable_dtype == torch.bfloat16 and not args.fp16)))
    fill("fp16.enabled", bool(args.fp16 or trainable_dtype == torch.float16))
    fill("optimizer.params.lr", args.learning_rate)
    fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2])
    fill("optimizer.params.eps", args.adam_epsilon)
    fill("optimizer.params.weight_decay", args.weight_decay)
    fill("scheduler.params.warmup_min_lr", 0.0)
    fill("scheduler.params.warmup_max_lr", args.learning_rate)
    fill("scheduler.params.warmup_num_steps", args.get_warmup_steps(num_training_steps))
    fill("scheduler.params.total_num_steps", num_training_steps)
    fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)  # as the HF integration sizes buckets
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)
    config = filler.config
    left = _find_auto(config)
    if left:
        raise ValueError(f"--deepspeed: no rule fills \"auto\" at {', '.join(left)}; give explicit values there.")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage") or 0)


def offloads(config: dict, what: str = "optimizer") -> bool:
    """ZeRO offloads ``what`` ("optimizer" or "param") to the CPU / NVMe."""
    offload = config.get("zero_optimization", {}).get(f"offload_{what}") or {}
    return (offload.get("device") or "none") != "none"


def trainable_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices, none on 1-D tensors (bias, norms)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check --trainable_modules.")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, args: GRPOConfig, config: dict) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; DeepSpeed's CPU Adam when the optimizer is offloaded and it builds."""
    groups = trainable_parameter_groups(model, args.weight_decay)
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if offloads(config, "optimizer"):
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as err:  # the op needs a C++ toolchain; torch's AdamW on the offloaded fp32 states still works
            logger.warning("DeepSpeedCPUAdam is unavailable (%s); using torch AdamW on the offloaded states.", err)
            config["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(groups, **kwargs)


def scheduler_factory(args: GRPOConfig, num_training_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """The LR schedule DeepSpeed steps after each applied optimizer step (not after a skipped one)."""
    def build(optimizer: torch.optim.Optimizer):
        return get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer,
            num_warmup_steps=args.get_warmup_steps(num_training_steps), num_training_steps=num_training_steps,
            scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}),
        )
    return build


@dataclass
class EngineParts:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    lr_scheduler: Any
    config: dict


def initialize_engine(model: torch.nn.Module, args: GRPOConfig, plan: BatchPlan, num_training_steps: int) -> EngineParts:
    """deepspeed.initialize over the whole model with the filled config, our AdamW and LR schedule."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    config = fill_deepspeed_config(
        load_deepspeed_config(args.deepspeed), args=args, plan=plan, num_training_steps=num_training_steps,
        hidden_size=_dit_width(model), trainable_dtype=trainable[0].dtype if trainable else torch.float32,
    )
    optimizer = None if "optimizer" in config else build_optimizer(model, args, config)
    scheduler = None if "scheduler" in config else scheduler_factory(args, num_training_steps)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        model_parameters=trainable if optimizer is None else None,
    )
    return EngineParts(engine=engine, optimizer=ds_optimizer, lr_scheduler=ds_scheduler, config=config)


def _dit_width(model: torch.nn.Module) -> int:
    transformer = getattr(model, "transformer", None)
    cfg = getattr(transformer, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads") and hasattr(cfg, "attention_head_dim"):
        return int(cfg.num_attention_heads * cfg.attention_head_dim)
    return 1024

"""Resume on a different world size: the checkpoint's weights and LR-schedule position, a fresh optimizer.

DeepSpeed partitions the ZeRO optimizer state by data-parallel rank and refuses to load it under another world
size. The weights do not depend on the partitioning: DeepSpeed's ``zero_to_fp32`` reader merges the fp32
master weights of any number of shards (ZeRO-2 or ZeRO-3). We copy them into the live (possibly partitioned)
parameters, refresh the optimizer's fp32 master copy from them, and restore the schedule position and step
counters; AdamW's moments restart from zero (the caller warns). ``--resume_reset_optimizer`` turns this on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deepgen_rl.model.safe_load import weights_only_loads

logger = logging.getLogger(__name__)

SOURCE = "--resume_from_checkpoint"
_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def model_states_file(tag_dir: Path) -> Path:
    """The rank-0 model-states file of a DeepSpeed tag folder (ZeRO-3 names it per rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"{tag_dir} has no mp_rank_00_model_states.pt (nor its ZeRO-3 per-rank form)")


def load_weights_reset_optimizer(engine, checkpoint_dir: Path, tag: str) -> None:
    """Collective under ZeRO-3. Weights, LR schedule and step counters from ``checkpoint_dir``; AdamW restarts."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(checkpoint_dir, source=SOURCE):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag,
                                                           exclude_frozen_parameters=True)
        model_states = torch.load(model_states_file(checkpoint_dir / tag), map_location="cpu")
    trainable = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(weights))
    if missing:
        raise ValueError(f"it lacks {len(missing)} trained parameter(s), e.g. {missing[:5]} (was it saved with "
                         "other --trainable_modules?)")
    copy_into_parameters(trainable, weights)
    # A ZeRO optimizer steps its own fp32 copy of the weights; make it the loaded one.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    _restore_schedule(engine, model_states)


def copy_into_parameters(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """params[name] <- weights[name] (cast to the parameter's dtype); partitioned ZeRO-3 parameters are gathered,
    written on rank 0 and re-partitioned from it."""
    import deepspeed

    partitioned = any(hasattr(p, "ds_id") for p in params.values())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                                             enabled=partitioned):
        for name, param in params.items():
            param.data.copy_(weights[name].to(device=param.device, dtype=param.dtype))


def _restore_schedule(engine, model_states: dict) -> None:
    scheduler_state = model_states.get("lr_scheduler")
    if engine.lr_scheduler is not None and scheduler_state is not None:
        engine.lr_scheduler.load_state_dict(scheduler_state)
        # A scheduler sets the rate on its next step(); the first step after resume must already use it.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for name in _COUNTERS:
        if name in model_states:
            setattr(engine, name, model_states[name])

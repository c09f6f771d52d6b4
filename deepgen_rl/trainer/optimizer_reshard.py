"""AdamW's moments of a ZeRO-1/2 checkpoint saved under another world size, re-split for this one (--replay_step).

A ZeRO-1/2 optimizer keeps, per parameter group, ONE flat fp32 vector (the group's parameters back to back, padded
at the end) split evenly over the ranks; each rank saves its slice of the weights and of every AdamW state (the
moments exp_avg / exp_avg_sq, with the padding on the last rank) in its ``*_optim_states.pt``. Stripping each
slice's padding and concatenating the slices in rank order gives the group's flat state, which does not depend on
the world size; DeepSpeed's own elastic-checkpoint loader re-pads and re-splits it for this run's ranks. So a
replay on 1 GPU of a step from a 32-GPU run applies the update the run applied, not a restarted AdamW's.

ZeRO-3 (per-parameter partitions) is not re-split here: there the replay needs the run's world size, or
--resume_reset_optimizer (moments restart).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deepgen_rl.model.safe_load import weights_only_loads

logger = logging.getLogger(__name__)

SOURCE = "--replay_step"


class ReshardUnsupported(RuntimeError):
    """The checkpoint's or the engine's optimizer cannot be re-split (not ZeRO-1/2)."""


def _optim_files(tag_dir: Path) -> list[Path]:
    def rank_of(path: Path) -> int:
        return int(path.name.split("zero_pp_rank_")[1].split("_")[0])

    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=rank_of)
    if not files:
        raise ReshardUnsupported(f"{tag_dir} holds no *_optim_states.pt")
    return files


def lean_partition_states(saved: dict) -> tuple[list[dict], object]:
    """One rank's optimizer dict -> (per group: its states without the partition padding, the AdamW step).

    Rigid format (the default): base_optimizer_state is torch's optimizer state_dict, one entry per group whose
    tensors are the rank's padded slice; group_paddings says how much of it is padding."""
    base = saved["base_optimizer_state"]
    if isinstance(base, list):  # already elastic (zero_optimization.elastic_checkpoint true)
        return base, saved.get("base_optimizer_state_step")
    paddings = saved["group_paddings"]
    groups, step = [], None
    for index, group in enumerate(base["param_groups"]):
        state = base["state"].get(group["params"][0], {})
        lean = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                lean[key] = value[:value.numel() - paddings[index]]
            else:
                lean[key] = value
                if key == "step":
                    step = value
        groups.append(lean)
    return groups, step


def load_resharded_optimizer(engine, checkpoint_dir: Path, tag: str) -> None:
    """Every rank: this run's slice of the checkpoint's AdamW states (any saved world size), and the step count.
    The weights and the LR schedule are weights_resume.py's; call after it."""
    optimizer = engine.optimizer
    restore = getattr(optimizer, "_restore_elastic_base_optimizer_state", None)
    if restore is None or getattr(optimizer, "single_partition_of_fp32_groups", None) is None:
        raise ReshardUnsupported("the optimizer is not DeepSpeed's ZeRO-1/2 (ZeRO-3 moments are not re-split)")
    tag_dir = Path(checkpoint_dir) / tag
    with weights_only_loads(checkpoint_dir, source=SOURCE):
        saved = [torch.load(path, map_location="cpu")["optimizer_state_dict"] for path in _optim_files(tag_dir)]
    if any(int(s.get("zero_stage", 0)) > 2 for s in saved):
        raise ReshardUnsupported(f"{tag_dir} is a ZeRO-3 checkpoint (its moments are not re-split)")
    elastic = []
    for one in saved:
        groups, step = lean_partition_states(one)
        elastic.append({"base_optimizer_state": groups, "base_optimizer_state_step": step,
                        "single_partition_of_fp32_groups": one["single_partition_of_fp32_groups"]})
    restore(elastic)
    # DeepSpeed writes the step as a param-group value; torch's AdamW reads the per-parameter state tensor.
    step = elastic[0]["base_optimizer_state_step"]
    for group in optimizer.optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.optimizer.state.get(param)
            if state is not None and step is not None and "step" in state:
                state["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))
    logger.info("%s: AdamW's moments of %s (saved by %d ranks) re-split for this world size.", SOURCE,
                checkpoint_dir, len(saved))

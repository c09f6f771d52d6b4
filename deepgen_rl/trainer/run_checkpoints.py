"""The trainer's side of checkpoints: when to save (--save_strategy / --save_steps), what a run adds to the engine's
checkpoint (sampler positions, EMA, DiffusionNFT's old policy), what a resume restores, and the run config logged.

The files themselves (layout, atomic rename, rotation, reading back) are checkpointing.py's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import deepgen_rl.trainer.checkpointing as checkpointing
from .nft import NFT_STATE_NAME

logger = logging.getLogger(__name__)


def save_strategy(args) -> str:
    """--save_strategy as a plain string ("no", "steps", ...), whether given as a str or an enum."""
    strategy = args.save_strategy
    return str(getattr(strategy, "value", strategy))


def save_every(args, max_steps: int) -> int:
    """--save_steps in GRPO steps (a value below 1 is a fraction of the run)."""
    every = args.save_steps
    return max(1, math.ceil(every * max_steps) if every < 1 else int(every))


def resume_path(args, requested: Optional[str], device) -> Optional[Path]:
    """The checkpoint to resume from (``requested`` or --resume_from_checkpoint); "latest" agreed by every rank."""
    requested = requested or args.resume_from_checkpoint
    resume = checkpointing.resolve_resume_path(requested, args.output_dir)
    if checkpointing.is_latest_request(requested):
        resume = checkpointing.agree_on_checkpoint(resume, args.output_dir, device)
    return resume


def is_renamer(args, engine, rank: int) -> bool:
    """Whether this process renames, rotates and moves checkpoint folders: global rank 0, or with
    --save_on_each_node (node-local storage) each node's local rank 0."""
    local_rank = int(getattr(engine, "local_rank", 0) or 0)
    return rank == 0 or (bool(args.save_on_each_node) and local_rank == 0)


def save_run(engine, args, state: checkpointing.TrainerState, *, rank: int, prompt_sampler, sftaux_sampler,
             ema, nft) -> Path:
    """Write checkpoint-<global_step> (collective): the engine, the trainer state with the samplers' positions,
    and rank 0's EMA and old-policy weights."""
    state.prompt_sampler = prompt_sampler.state_dict()
    if sftaux_sampler is not None:
        state.sftaux_sampler = sftaux_sampler.state_dict()
    renamer = is_renamer(args, engine, rank)
    ema_state = ema.state_dict() if ema is not None else None  # collective when sharded: whole on rank 0 only
    ema_state = ema_state if rank == 0 else None
    extra = {NFT_STATE_NAME: nft.state_dict()} if nft is not None and rank == 0 else None
    return checkpointing.save_checkpoint(engine, args.output_dir, state, rank=rank, renamer=renamer,
                                         save_total_limit=args.save_total_limit, ema_state=ema_state,
                                         extra_states=extra)


def load_run(engine, args, path: str | Path, *, rank: int, world_size: int, max_steps: int, model, prompt_sampler,
             sftaux_sampler, ema, nft) -> checkpointing.TrainerState:
    """Restore a checkpoint into the engine, samplers, EMA and old policy; the returned state describes this run
    (its max_steps, world size and global batch)."""
    state = checkpointing.load_checkpoint(engine, path, rank=rank, world_size=world_size,
                                          reset_optimizer=args.resume_reset_optimizer,
                                          reshard_optimizer=bool(getattr(args, "replay_step", 0)))
    # Every draw is keyed by global position (global_draws.py): only the global batch changes the sequences.
    if state.global_batch_size != args.global_batch_size:
        logger.warning("%s was saved with global batch %d; now %d: the prompt and noise sequences will differ from "
                       "an uninterrupted run.", path, state.global_batch_size, args.global_batch_size)
    prompt_sampler.load_state_dict(state.prompt_sampler)
    if sftaux_sampler is not None and state.sftaux_sampler:
        sftaux_sampler.load_state_dict(state.sftaux_sampler)
    if ema is not None:
        ema.load_checkpoint(model, Path(path))
    if nft is not None:
        nft.load_checkpoint(model, Path(path), source=checkpointing.RESUME_FLAG)
    state.max_steps, state.world_size = max_steps, world_size
    state.global_batch_size = args.global_batch_size
    if rank == 0:
        logger.info("resumed from %s at step %d", path, state.global_step)
    return state


def run_config(args, *, world_size: int, trained_modules, gradient_accumulation_steps: int,
               model_flags: Optional[dict] = None, lora=None) -> dict:
    """The scalar flags (the training flags and ``model_flags``, the ModelArguments) plus the derived facts, as the
    trackers record the run and every checkpoint's trainer_state.json keeps it. ``lora`` (trainable.LoraSettings,
    None without --use_lora): the adapter the DiT really carries, which the converter merges at alpha / rank."""
    config = {k: v for k, v in {**(model_flags or {}), **vars(args)}.items()
              if isinstance(v, (int, float, str, bool)) or v is None}
    config.update({"world_size": world_size, "trained_modules": ",".join(trained_modules),
                   "gradient_accumulation_steps": gradient_accumulation_steps, "use_lora": lora is not None})
    if lora is not None:
        config.update({"lora_rank": lora.rank, "lora_alpha": lora.alpha,
                       "lora_target_modules": ",".join(lora.target_modules)})
    return config

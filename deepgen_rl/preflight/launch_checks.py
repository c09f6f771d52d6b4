"""Checks of a launch that need only the flags and the files, run before any model loads or server is awaited.

Used by the launch preflight (``python -m deepgen_rl.preflight``, run by ``scripts/train.sh``) and by the entry
point (``deepgen_rl.grpo_deepgen``, for runs started without train.sh):

* a real-size model (see :func:`is_real_size_model`) without ``CHECKPOINT`` is refused, naming the variable,
  unless ``--allow_untrained_connector``: the connector, projectors and meta queries would keep their random
  initialisation and the run would burn GPU hours for nothing;
* a real-size model trained or evaluated on our SHIPPED example data (48 prompts, 12 eval prompts, six 64x64
  PNGs under ``assets/``) gets a prominent warning with the counts;
* the global batch must split into whole prompt groups on every rank of the world size, and the --deepspeed JSON
  must fill as the trainer fills it (no explicit batch value that disagrees, no "auto" left);
* the run length: prompts, prompts per step, epochs -> GRPO steps, and when the first checkpoint is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config.model_flags import CHECKPOINT_ENV, QWEN_ENV, REPO_ROOT, DataArguments, ModelArguments

# Our shipped example data live here (prompt files, eval CSVs, SFT-aux images).
SHIPPED_DATA_ROOT = REPO_ROOT / "assets"
# An LLM this wide is a real model (Qwen2.5-VL-3B: 2048); our tiny test models are 32-64 wide.
REAL_MODEL_MIN_HIDDEN_SIZE = 1024


def _llm_hidden_size(qwen_path: str) -> Optional[int]:
    """hidden_size of the Qwen folder's config.json (top level or its text_config); None when unreadable."""
    try:
        config = json.loads((Path(qwen_path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return size if isinstance(size, int) else None


def is_real_size_model(model_args: ModelArguments) -> bool:
    """True when the Qwen folder holds an LLM of real width (>= REAL_MODEL_MIN_HIDDEN_SIZE), i.e. not a tiny
    test model; False when the folder is missing or unreadable (its own check reports that)."""
    size = _llm_hidden_size(model_args.qwen2_5_vl_model_name_or_path) if model_args.qwen2_5_vl_model_name_or_path else None
    return size is not None and size >= REAL_MODEL_MIN_HIDDEN_SIZE


def untrained_connector_problem(model_args: ModelArguments) -> Optional[str]:
    """The refusal of a real-size model without CHECKPOINT (None when fine)."""
    if model_args.checkpoint or model_args.allow_untrained_connector or not is_real_size_model(model_args):
        return None
    return (f"{CHECKPOINT_ENV} is not set, but {QWEN_ENV} is a real-size model: the connector, projectors and meta "
            f"queries would keep their random initialisation. Export {CHECKPOINT_ENV}=/path/to/the DeepGen_Image "
            "pretraining .pth (or pass --checkpoint), or pass --allow_untrained_connector if an untrained connector "
            "is what you mean.")


def is_shipped(path: Path) -> bool:
    """Whether ``path`` lies under the repository's example data (``assets/``)."""
    try:
        Path(path).expanduser().resolve().relative_to(SHIPPED_DATA_ROOT)
    except ValueError:
        return False
    return True


def shipped_data_lines(dataset, eval_datasets: Optional[list], sftaux_datasets: Optional[list],
                       data_args: DataArguments) -> list[str]:
    """One line per input that is our shipped example data, with its size.

    ``dataset``: the training DatasetConfig; ``eval_datasets``: ``load_eval_datasets``' list (None when
    evaluation is off); ``sftaux_datasets``: ``load_sftaux_config``'s list (None when SFT-aux is off)."""
    from ..data.prompts import PromptDataset

    lines = []
    shipped = [entry for entry in dataset.datasets if is_shipped(entry.path)]
    if shipped:
        count = sum(len(PromptDataset(entry)) for entry in shipped)
        lines.append(f"DATASET_CONFIG (--dataset_config) = {data_args.dataset_config}: {len(shipped)} of "
                     f"{len(dataset.datasets)} dataset(s) are shipped examples, {count} prompt(s) in all")
    if eval_datasets:
        shipped_eval = [d for d in eval_datasets if is_shipped(d.spec.path)]
        if shipped_eval:
            count = sum(len(d.prompts) for d in shipped_eval)
            lines.append(f"EVAL_DATASET_CONFIG (--eval_dataset_config) = {data_args.eval_dataset_config}: "
                         f"{count} eval prompt(s) of the shipped examples")
    if sftaux_datasets:
        images = [path for d in sftaux_datasets for path, _ in d.items if is_shipped(path)]
        if images:
            lines.append(f"SFTAUX_DATASET_CONFIG (--sftaux_dataset_config) = {data_args.sftaux_dataset_config}: "
                         f"{len(images)} image(s) of the shipped examples (assets/sftaux/)")
    return lines


def shipped_data_warning(lines: list[str]) -> str:
    """A banner that a log cannot hide: the real model is about to train on toy data."""
    rule = "!" * 100
    body = "\n".join(f"!!   {line}" for line in lines)
    return (f"{rule}\n!! WARNING: a real-size model with the repository's small EXAMPLE data:\n{body}\n"
            "!! Point these variables (or flags) at your real data; the examples only show the formats.\n"
            f"{rule}")


def batch_problem(args, world_size: int, sftaux_enabled: bool) -> Optional[str]:
    """The batch plan's refusal (--global_batch_size over the world size) as a message, None when it splits."""
    try:
        _plan(args, world_size, sftaux_enabled)
    except ValueError as err:
        return f"{err} (world size {world_size} = NNODES x NGPUS)"
    return None


def sftaux_idle_ranks_warning(args, world_size: int) -> Optional[str]:
    """A warning when the global SFT-aux batch leaves ranks without an item (they run one at weight 0, so every rank
    runs the same backward: core/sftaux_batch.py), None otherwise."""
    items = args.sftaux_global_batch_size
    if args.sftaux_coef <= 0 or items >= world_size:
        return None
    return (f"--sftaux_global_batch_size {items} < world size {world_size}: {world_size - items} rank(s) get no "
            "SFT-aux item and run one at weight 0 each step (their time, no effect on the loss); a multiple of "
            f"{world_size} uses them.")


def _plan(args, world_size: int, sftaux_enabled: bool):
    from ..trainer.batching import plan_batches

    return plan_batches(global_batch_size=args.global_batch_size, rollout_n=args.rollout_n, world_size=world_size,
                        atrain_micro_batch_size=args.atrain_micro_batch_size,
                        num_train_timesteps=args.num_train_timesteps, sftaux_enabled=sftaux_enabled,
                        optimizer_step_schedule=args.optimizer_step_schedule,
                        actor_update_steps=args.atrain_num_actor_update_steps, kl_step=args.beta > 0)


def deepspeed_problem(args, world_size: int, sftaux_enabled: bool, steps: int) -> Optional[str]:
    """The --deepspeed JSON filled as the trainer fills it (an explicit batch value that disagrees with the batch
    plan, an "auto" no rule fills): found here instead of after every rank loaded the model. Assumes the batch
    splits (``batch_problem`` is None)."""
    import torch

    from ..trainer.deepspeed_setup import fill_deepspeed_config, load_deepspeed_config

    plan = _plan(args, world_size, sftaux_enabled)
    try:
        # The DiT width and dtype only size buckets and pick bf16: no check depends on them.
        fill_deepspeed_config(load_deepspeed_config(args.deepspeed), args=args, plan=plan,
                              num_training_steps=steps * plan.optimizer_steps_per_rollout, hidden_size=1536,
                              trainable_dtype=torch.bfloat16)
    except ValueError as err:
        return f"DEEPSPEED_CONFIG (--deepspeed) = {args.deepspeed}: {err}"
    return None


@dataclass(frozen=True)
class RunLength:
    """How long a launch runs, in GRPO steps (one rollout + update each), and when it first checkpoints."""

    num_prompts: int
    prompts_per_step: int  # --global_batch_size / --rollout_n, over all ranks
    num_train_epochs: float
    max_steps: int  # --max_steps (0: from the epochs)
    steps: int
    save_every: int  # GRPO steps between checkpoints; 0: none before the end

    @property
    def first_checkpoint(self) -> int:
        return min(self.save_every, self.steps) if self.save_every else self.steps

    def describe(self) -> str:
        if self.max_steps > 0:
            length = f"--max_steps {self.max_steps} -> {self.steps} GRPO step(s)"
        else:
            per_epoch = math.ceil(self.num_prompts / self.prompts_per_step)
            length = (f"{self.num_prompts} prompt(s) / {self.prompts_per_step} prompts per step = {per_epoch} step(s) "
                      f"per epoch x --num_train_epochs {self.num_train_epochs:g} -> {self.steps} GRPO step(s); "
                      "--max_steps N sets the length directly")
        saving = (f"first checkpoint after step {self.first_checkpoint}, then every {self.save_every} (--save_steps)"
                  if self.save_every else "no checkpoint before the end (--save_strategy no)")
        return f"run length: {length}; {saving}."


def run_length(args, num_prompts: int) -> RunLength:
    """The trainer's own step count (``total_training_steps``) and save interval for these flags."""
    from ..trainer.batching import total_training_steps
    from ..trainer.run_checkpoints import save_every, save_strategy

    prompts_per_step = args.global_batch_size // args.rollout_n
    steps = total_training_steps(max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
                                 num_prompts=num_prompts, prompts_per_step=prompts_per_step)
    every = save_every(args, steps) if save_strategy(args) == "steps" else 0
    return RunLength(num_prompts, prompts_per_step, args.num_train_epochs, args.max_steps, steps, every)


class LaunchCheckError(ValueError):
    """The flags and files cannot make a run; the message lists every problem."""


def require_launchable(args, model_args: ModelArguments, data_args: DataArguments, dataset, world_size: int,
                       sftaux_datasets: Optional[list]) -> list[str]:
    """The entry point's checks before any model loads (runs without train.sh's preflight): raises
    LaunchCheckError on a real-size model without CHECKPOINT or a batch that does not split over the world size;
    returns the log lines to print (the run length, and the shipped-data banner when it applies)."""
    from ..data.prompts import PromptDataset

    length = run_length(args, sum(len(PromptDataset(entry)) for entry in dataset.datasets))
    sftaux = sftaux_datasets is not None
    problems = [p for p in [untrained_connector_problem(model_args), batch_problem(args, world_size, sftaux)] if p]
    if not problems:
        problems += [p for p in [deepspeed_problem(args, world_size, sftaux, length.steps)] if p]
    if problems:
        raise LaunchCheckError(f"{len(problems)} launch problem(s) stop the run before any model loads:\n"
                               + "\n".join(f"  - {problem}" for problem in problems))
    lines = [length.describe()]
    if is_real_size_model(model_args):
        eval_sets = None
        if args.eval_freq > 0 and Path(data_args.eval_dataset_config).is_file():
            from ..eval.dataset import load_eval_datasets

            eval_sets = load_eval_datasets(data_args.eval_dataset_config)
        shipped = shipped_data_lines(dataset, eval_sets, sftaux_datasets, data_args)
        lines += [shipped_data_warning(shipped)] if shipped else []
    return lines

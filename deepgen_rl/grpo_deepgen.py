"""Entry point of GRPO training (torchrun): parse flags, build the parts, train, close.

    torchrun --nproc_per_node $NGPUS -m deepgen_rl.grpo_deepgen --output_dir outputs/run \\
        --deepspeed scripts/deepspeed/zero2.json --report_to wandb,swanlab ...

Also runs as a single process without torchrun (``python -m deepgen_rl.grpo_deepgen ...``). Every flag and its
default: deepgen_rl/config/ (``--help``). Started without ``scripts/train.sh`` (and its preflight), it still checks
the flags and files before any model loads: input contents (``preflight.content``), a real-size model without
CHECKPOINT, the batch over the world size and the --deepspeed JSON (``preflight.launch_checks``); rank 0 prints the run
length and, for a real-size model on our shipped example data, a warning banner.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # imported lazily at run time: the launcher must start fast
    from deepgen_rl.config import (DataArguments, EvalArguments, GRPOConfig, JudgeArguments, ModelArguments,
                                   RewardArguments)

# Exit status of a run stopped because a reward kept failing (1 stays "crashed"; torchrun passes either on).
EXIT_REWARD_FAILURE = 3
# Exit status of a run stopped by the divergence guard (--max_skipped_steps, NaN/inf weights at a save).
EXIT_DIVERGED = 4
# Exit status of a run stopped by a reward-hacking alarm under --on_reward_hacking stop (trainer/hacking.py).
EXIT_REWARD_HACKING = 5
# Exit status of a fresh start refused because --output_dir holds another run (argparse's usage-error status).
EXIT_OUTPUT_DIR_IN_USE = 2
# Exit status of flags or files that cannot run (launch_checks.LaunchCheckError), found before any model loads.
EXIT_USAGE = 2
# The guide: wandb and swanlab log OFFLINE unless the user exports another mode.
TRACKER_MODE_DEFAULTS = {"WANDB_MODE": "offline", "SWANLAB_MODE": "offline"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_single_process_env(environ) -> None:
    """Outside torchrun, describe a one-process group so DeepSpeed and accelerate can initialise."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return
    environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(_free_port()))


def log_level_for(rank: int, log_level: str, log_level_replica: str) -> int:
    """--log_level on rank 0, --log_level_replica elsewhere; 'passive' keeps our defaults (INFO / WARNING)."""
    from transformers.training_args import trainer_log_levels  # the flags' names -> logging levels

    name = log_level if rank == 0 else log_level_replica
    if name == "passive":
        return logging.INFO if rank == 0 else logging.WARNING
    return trainer_log_levels[name]


def _setup_logging(rank: int, args: Optional[GRPOConfig] = None) -> None:
    levels = (args.log_level, args.log_level_replica) if args is not None else ("passive", "passive")
    logging.basicConfig(level=log_level_for(rank, *levels),
                        format=f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")


def _init_distributed(ddp_timeout_s: Optional[int] = None):
    """The process group (gloo on CPU, the accelerator's backend otherwise; collectives time out after --ddp_timeout
    seconds, DeepSpeed's default when None) and this rank's device."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(**({} if ddp_timeout_s is None else {"timeout": timedelta(seconds=ddp_timeout_s)}))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    return accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"


def build_trainer(args: GRPOConfig, model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
                  judge_args: JudgeArguments, eval_args: EvalArguments, device: str):
    """Model, prompt sampler, rewards, SFT-aux data and the trainer, from the parsed flags."""
    from transformers import set_seed

    from deepgen_rl.data import PromptSampler, load_dataset_config
    from deepgen_rl.core.distributed import rank_and_world
    from deepgen_rl.preflight.launch_checks import require_launchable
    from deepgen_rl.model import load_deepgen_model
    from deepgen_rl.rewards import build_rewards
    from deepgen_rl.rewards.registry import known_reward_names, vllm_reward_urls
    from deepgen_rl.rewards.reward_step import RewardStep
    from deepgen_rl.trainer import LoraSettings, TrackerSettings, TrainingRun
    from deepgen_rl.eval.edit_eval import edit_judge_for_eval
    from deepgen_rl.trainer.eval_hook import build_eval_hook

    rank, world_size = rank_and_world()
    set_seed(args.seed)
    dataset_config = load_dataset_config(data_args.dataset_config, known_reward_names(reward_args))
    from deepgen_rl.preflight.content import require_valid_contents

    require_valid_contents(dataset_config, model_args.checkpoint,
                           data_args.eval_dataset_config if args.eval_freq else "")
    prompt_sampler = PromptSampler(dataset_config, seed=args.seed, rank=rank)
    sftaux_sampler = None
    if args.sftaux_coef > 0:
        from deepgen_rl.sft import SftAuxSampler, load_sftaux_config

        sftaux_sampler = SftAuxSampler(load_sftaux_config(data_args.sftaux_dataset_config), seed=args.seed,
                                       height=args.image_height, width=args.image_width)
    # Flags and files first: before any reward server is awaited or a scorer / the model is loaded.
    notes = require_launchable(args, model_args, data_args, dataset_config, world_size,
                               None if sftaux_sampler is None else sftaux_sampler.datasets)
    if rank == 0:
        for note in notes:  # the banner of shipped data on stderr, where warnings go
            print(note, file=sys.stderr if note.startswith("!") else sys.stdout, flush=True)
    rewards = build_rewards(dataset_config.reward_names, reward_args, model_args.clip_model_name_or_path, device)
    reward_step = RewardStep(rewards, dataset_config.reward_names, deadline_s=args.reward_step_deadline or None)
    eval_hook = None
    try:
        model = load_deepgen_model(model_args, device=device)  # straight to this rank's GPU: little host RAM
        lora = LoraSettings(model_args.lora_rank, model_args.lora_alpha) if model_args.use_lora else None
        # The edit sets' judge is built only once evaluation is known to run (the hook closes an eval-only one).
        eval_hook = build_eval_hook(args, data_args, judge_args, eval_args, vllm_reward_urls(rewards),
                                    lambda: edit_judge_for_eval(data_args.eval_dataset_config, reward_args, rewards))
        return TrainingRun(
            model, args, prompt_sampler=prompt_sampler, reward_step=reward_step,
            num_prompts=sum(prompt_sampler.sizes), trainable_modules=model_args.trainable_modules, lora=lora,
            sftaux_sampler=sftaux_sampler, eval_hook=eval_hook,
            tracker=TrackerSettings.from_env(args.report_to, args.run_name, os.environ),
            model_flags=dataclasses.asdict(model_args),
        )
    except BaseException:
        reward_step.close()
        if eval_hook is not None:
            eval_hook.close()
        raise


def main(argv: Optional[list[str]] = None) -> int:
    for name, value in TRACKER_MODE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    ensure_single_process_env(os.environ)
    from deepgen_rl.config import parse_args_or_exit

    args, *groups = parse_args_or_exit(argv)
    device = _init_distributed(args.ddp_timeout)
    _setup_logging(int(os.environ.get("RANK", "0")), args)
    from deepgen_rl.trainer.divergence import TrainingDiverged
    from deepgen_rl.trainer.failure_budget import RewardFailureBudgetExceeded
    from deepgen_rl.trainer.hacking import RewardHackingStopped
    from deepgen_rl.preflight.launch_checks import LaunchCheckError
    from deepgen_rl.trainer.replay import ReplayError, check_replay_flags
    from deepgen_rl.trainer.run_folder import OutputDirInUseError, claim_output_dir, resume_requested

    log = logging.getLogger("deepgen_rl")
    try:
        check_replay_flags(args.replay_step, args.resume_from_checkpoint, args.output_dir)
        if not resume_requested(args.resume_from_checkpoint) or args.replay_step:  # a replay's folder is new
            claim_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, mover=False)  # before the model
        trainer = build_trainer(args, *groups, device)
        try:
            trainer.train()
        finally:
            trainer.close()
    except RewardFailureBudgetExceeded as err:
        log.error("training stopped: %s", err)
        return EXIT_REWARD_FAILURE
    except TrainingDiverged as err:
        log.error("training stopped: %s", err)
        return EXIT_DIVERGED
    except RewardHackingStopped as err:
        log.error("training stopped: %s", err)
        return EXIT_REWARD_HACKING
    except OutputDirInUseError as err:
        log.error("%s", err)
        return EXIT_OUTPUT_DIR_IN_USE
    except (LaunchCheckError, ReplayError) as err:  # flags or files that cannot run: the reason, not a traceback
        if int(os.environ.get("RANK", "0")) == 0:
            log.error("cannot launch: %s", err)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    from deepgen_rl.core.worker_errors import recorded

    try:
        exit_code = recorded(main)()  # torchrun's root cause: this rank's own error (core/worker_errors.py)
    finally:  # here, not in main(): tests call main() inside a session-wide process group
        from deepgen_rl.core.distributed import destroy

        destroy()
    sys.exit(exit_code)

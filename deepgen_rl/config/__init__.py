"""Every flag of DeepGen-RL, with its default, in one place.

Six groups are parsed together by :func:`parse_args` with ``transformers.HfArgumentParser``:

* :class:`GRPOConfig` -- a ``transformers.TrainingArguments`` with the GRPO, sampling and eval flags;
* :class:`ModelArguments` -- where the weights live and which modules train;
* :class:`DataArguments` -- dataset YAMLs;
* :class:`RewardArguments` -- the reward servers and their timeouts / retries;
* :class:`JudgeArguments` -- the UniGenBench judge server and its own timeouts / retries;
* :class:`EvalArguments` -- how much a UniGenBench evaluation covers and how long it may take (the trainer's
  periodic evaluation and ``python -m deepgen_rl.eval``).

Defaults follow the user guide (docs/training_guide.md#default-parameters) and the reference semantics of
docs/algorithms.md. Model paths and server URLs default to the environment variables the guide names,
read once (when a dataclass or the parser is built) and nowhere else.

The fields live in small modules, one per concern: ``model_flags`` (ModelArguments, DataArguments),
``server_flags`` (RewardArguments, JudgeArguments, EvalArguments), GRPOConfig's mixins ``algorithm_config``,
``grpo_flags`` and ``run_flags``, and the validation helpers in ``flag_checks``. This module is the import surface:
import every flag class and constant from here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments

from ..core.sde_checks import check_sde_eta, num_train_steps, num_window_train_steps, sde_window_range
from ..rl.advantages import ADVANTAGE_TYPES
from ..rl.losses import KL_TYPES, clip_band
from ..sampling.steps import LOGPROB_VARIANTS
from .algorithm_config import AlgorithmFlags, validate_algorithm_flags
from .deepspeed_json import read_deepspeed_json
from .flag_checks import _check_choice, _check_positive, _check_range
from .grpo_flags import (DEFAULT_SDE_ETA, KL_FORWARDS, OPTIMIZER_STEP_SCHEDULES, SDE_SAMPLERS, ObjectiveFlags,
                         OptimizerStepSchedule, RolloutFlags, SdeSampler, removed_flag_errors)
from .model_flags import (CHECKPOINT_ENV, CLIP_ENV, MODEL_DTYPES, QWEN_ENV, SD3_ENV, TRAINABLE_MODULE_SETS,
                          DataArguments, ModelArguments, ModelDtype, TrainableModuleSet)
from .run_flags import EMA_DEVICES, RunFlags
from .server_flags import (DEFAULT_EDIT_JUDGE_PORT, DEFAULT_OCR_PORT, DEFAULT_UNIFIEDREWARD_PORT,
                           DEFAULT_UNIGENBENCH_PORT, EvalArguments, JudgeArguments, RewardArguments)
from .trainer_flags import HELP_EPILOG, GroupedArgumentParser, refused_flag_errors

__all__ = [
    "ADVANTAGE_TYPES", "ARGUMENT_GROUPS", "CHECKPOINT_ENV", "CLIP_ENV", "DEFAULT_EDIT_JUDGE_PORT", "DEFAULT_OCR_PORT",
    "DEFAULT_SDE_ETA", "DEFAULT_UNIFIEDREWARD_PORT", "DEFAULT_UNIGENBENCH_PORT", "KL_TYPES", "LOGPROB_VARIANTS",
    "MODEL_DTYPES", "OPTIMIZER_STEP_SCHEDULES", "QWEN_ENV", "SD3_ENV", "SDE_SAMPLERS", "TRAINABLE_MODULE_SETS",
    "DataArguments", "EvalArguments", "GRPOConfig", "JudgeArguments", "ModelArguments", "ModelDtype",
    "OptimizerStepSchedule", "RewardArguments", "SdeSampler", "TrainableModuleSet", "build_parser", "parse_args",
    "parse_args_or_exit", "removed_flag_errors",
]


# Dataclass fields follow the bases from last to first: AlgorithmFlags, the inherited TrainingArguments,
# RolloutFlags, ObjectiveFlags, RunFlags, then any declared below (the order of --help).
@dataclass
class GRPOConfig(RunFlags, ObjectiveFlags, RolloutFlags, TrainingArguments, AlgorithmFlags):
    """``TrainingArguments`` plus the GRPO flags of docs/training_guide.md#default-parameters and docs/algorithms.md."""

    # --- overrides of TrainingArguments defaults (guide values) ---
    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in backward to save memory."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "Resume from a checkpoint folder ($OUTPUT_DIR/checkpoint-N), or 'latest': the newest "
                  "complete checkpoint in --output_dir (a fresh start when there is none, so an auto-restarted job "
                  "can always pass it). Restores weights, optimizer, LR schedule, RNG and data position."},
    )
    # HF's 500 would let a crash that is not a SIGTERM (OOM, node loss) lose hours of GRPO steps.
    save_steps: float = field(
        default=10,
        metadata={"help": "Checkpoint every N GRPO steps (a value below 1: that fraction of the run). 10 bounds what "
                  "a crash loses to 10 steps (tens of minutes at the guide's settings); each checkpoint holds the "
                  "weights and optimizer states, so set --save_total_limit to bound the disk used."},
    )

    def __post_init__(self) -> None:
        self._validate_grpo_flags()
        # Type-check the DeepSpeed JSON now, not at the first optimizer step ("gradient_clipping": "1.0").
        if isinstance(self.deepspeed, str) and self.deepspeed:
            ds_config = read_deepspeed_json(self.deepspeed)
            stage = (ds_config.get("zero_optimization") or {}).get("stage")
            if (self.ema_decay > 0 and self.ema_device == "cpu" and isinstance(stage, (int, float))
                    and stage >= 3):  # the host copy averages whole parameters; the sharded one does not need them
                raise ValueError(f"--ema_device cpu needs whole parameters on every rank, but --deepspeed "
                                 f"{self.deepspeed} is ZeRO-3 (partitioned): use --ema_device gpu (sharded "
                                 "beside the fp32 master partition).")
        if self.sde_eta is None:
            self.sde_eta = DEFAULT_SDE_ETA[self.atrain_sde_sampler]
        # The guide's launcher passes `--report_to wandb,swanlab`; TrainingArguments expects a list.
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        elif isinstance(self.report_to, list):
            self.report_to = [name.strip() for item in self.report_to for name in item.split(",") if name.strip()]
        super().__post_init__()
        # TrainingArguments just registered a ZeRO-3 --deepspeed JSON with transformers, which would then build
        # every from_pretrained / from_config model under deepspeed.zero.Init (partitioned before CHECKPOINT loads,
        # and needing mpi4py outside a launcher: the estimator's meta build crashed on every ZeRO-3 config). Our
        # trainer loads whole weights and lets deepspeed.initialize partition them.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()

    def _validate_grpo_flags(self) -> None:
        _check_choice("atrain_sde_sampler", self.atrain_sde_sampler, SDE_SAMPLERS)
        _check_choice("atrain_adv_type", self.atrain_adv_type, ADVANTAGE_TYPES)
        _check_choice("atrain_kl_type", self.atrain_kl_type, KL_TYPES)
        _check_choice("logprob_variant", self.logprob_variant, LOGPROB_VARIANTS)
        _check_choice("optimizer_step_schedule", self.optimizer_step_schedule, OPTIMIZER_STEP_SCHEDULES)
        _check_choice("kl_forward", self.kl_forward, KL_FORWARDS)
        _check_positive("atrain_num_actor_update_steps", self.atrain_num_actor_update_steps)
        validate_algorithm_flags(self)  # --atrain_algorithm and its flags (algorithm_config.py)
        clip_band(self.clip_range, self.clip_range_low, self.clip_range_high)
        for flag in ("rollout_n", "rollout_micro_batch_size", "atrain_micro_batch_size", "global_batch_size",
                     "num_inference_steps", "image_height", "image_width", "sftaux_global_batch_size"):
            _check_positive(flag, getattr(self, flag))
        _check_positive("vae_decode_micro_batch_size", self.vae_decode_micro_batch_size)
        if self.rollout_n < 2:
            raise ValueError(f"--rollout_n must be >= 2 (a group needs two samples to compare); got {self.rollout_n}.")
        if self.global_batch_size % self.rollout_n:
            raise ValueError(
                f"--global_batch_size ({self.global_batch_size}) must be a multiple of --rollout_n ({self.rollout_n})."
            )
        for flag in ("image_height", "image_width"):
            if getattr(self, flag) % 16:
                raise ValueError(f"--{flag} must be a multiple of 16 (VAE x8, DiT patch x2); got {getattr(self, flag)}.")
        num_train_steps(self.num_inference_steps, self.timestep_fraction)  # its bounds: T >= 2, fraction in (0, 1]
        _check_range("sftaux_coef", self.sftaux_coef, 0.0, 1.0)
        if self.sde_eta is not None:
            check_sde_eta(self.sde_eta)
        for flag in ("clip_range", "beta", "reward_std_floor", "rollout_cfg_scale", "zero_variance_rtol"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        if self.advantage_clip <= 0:
            raise ValueError(f"--advantage_clip must be > 0; got {self.advantage_clip}.")
        for flag in ("eval_freq", "sample_image_freq"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0 (0 disables); got {getattr(self, flag)}.")
        for flag in ("max_failed_reward_steps", "reward_step_deadline", "max_skipped_steps", "stall_report_s"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0; got {getattr(self, flag)}.")
        _check_range("max_reward_failure_rate", self.max_reward_failure_rate, 0.0, 1.0, low_open=True)
        for flag in ("monitor_baseline_steps", "monitor_patience"):
            _check_positive(flag, getattr(self, flag))
        for flag in ("monitor_z", "monitor_eval_window"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0 (0 turns that alarm off); got {getattr(self, flag)}.")
        if self.monitor_eval_window == 1:
            raise ValueError("--monitor_eval_window must be 0 (off) or >= 2: a trend needs two evaluations; got 1.")
        _check_choice("on_reward_hacking", self.on_reward_hacking, ("warn", "stop"))
        _check_positive("reward_failure_window", self.reward_failure_window)
        if self.gpu_peak_tflops is not None and not self.gpu_peak_tflops > 0:
            raise ValueError(f"--gpu_peak_tflops must be > 0 (or unset: from the GPU's name); got "
                             f"{self.gpu_peak_tflops}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1) (0 = no EMA); got {self.ema_decay}.")
        _check_positive("ema_update_every", self.ema_update_every)
        _check_choice("ema_device", self.ema_device, EMA_DEVICES)
        if self.sde_window_size:
            sde_window_range(self.num_inference_steps, self.sde_window_size, self.sde_window_range)

    @property
    def num_train_timesteps(self) -> int:
        """How many of the T denoising steps one rollout trains on (``rl.timesteps``; with --sde_window_size, of
        the window's steps)."""
        if self.sde_window_size:
            _, end = sde_window_range(self.num_inference_steps, self.sde_window_size, self.sde_window_range)
            return num_window_train_steps(self.num_inference_steps, self.sde_window_size, self.timestep_fraction, end)
        return num_train_steps(self.num_inference_steps, self.timestep_fraction)


ARGUMENT_GROUPS = (GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments, EvalArguments)


def build_parser() -> HfArgumentParser:
    """Our flags first, grouped by dataclass; inherited Trainer flags the loop ignores are hidden (and refused)."""
    return GroupedArgumentParser(ARGUMENT_GROUPS, prog="python -m deepgen_rl.grpo_deepgen",
                                 usage="%(prog)s --output_dir DIR [flags]  (all flags, by group: --help)",
                                 epilog=HELP_EPILOG)


def parse_args(argv: Optional[list[str]] = None
               ) -> tuple[GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments, EvalArguments]:
    """Parse command-line flags (``argv`` or ``sys.argv``) into the argument groups of ``ARGUMENT_GROUPS``."""
    removed = removed_flag_errors(list(sys.argv[1:] if argv is None else argv))
    if removed:
        raise ValueError("\n".join(removed))
    parser = build_parser()
    # Inherited Trainer flags our loop does not read stop the run instead of being ignored (trainer_flags.py);
    # checked on the raw parsed values, before TrainingArguments normalises some of them.
    namespace, _ = parser.parse_known_args(args=argv)
    refused = refused_flag_errors(namespace, GRPOConfig)
    if refused:
        raise ValueError("\n".join(refused))
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def parse_args_or_exit(argv: Optional[list[str]] = None
                       ) -> tuple[GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments,
                                  EvalArguments]:
    """:func:`parse_args` for the command lines: a bad flag or value ends in its message and exit status 2 (as
    argparse's own errors), not in a traceback through the dataclasses' validation."""
    try:
        return parse_args(argv)
    except (ValueError, FileNotFoundError) as err:  # FileNotFoundError: e.g. --deepspeed naming no file
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

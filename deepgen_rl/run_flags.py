"""The evaluation, logging, failure-budget, resume, EMA and step-pipeline flags of
:class:`deepgen_rl.config.GRPOConfig` (a dataclass mixin: its fields join the GRPOConfig group of ``--help``;
``GRPOConfig._validate_grpo_flags`` checks them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

EmaDevice = Literal["cpu", "same"]  # also trainer/ema.py's
EMA_DEVICES: tuple[str, ...] = get_args(EmaDevice)


@dataclass
class RunFlags:
    """Evaluation and logging, reward failure budget, resume, EMA and the step pipeline."""

    # --- evaluation and logging ---
    eval_freq: int = field(default=10, metadata={"help": "Run UniGenBench evaluation every N optimizer steps (0: never)."})
    sample_image_freq: int = field(default=10, metadata={"help": "Log a grid of rollout images every N steps (0: never)."})
    gpu_peak_tflops: Optional[float] = field(
        default=None,
        metadata={"help": "Dense bf16 peak TFLOP/s of one GPU, for the perf/<phase>_mfu metrics (docs/compute.md). "
                  "Default: from the CUDA device name (H100, H200, A100, H20, L40S), else no MFU is logged."},
    )
    # --- reward failure budget (issue 11, deepgen_rl/trainer/failure_budget.py) ---
    max_failed_reward_steps: int = field(
        default=3,
        metadata={"help": "Stop (exit 3, after a checkpoint) when a reward failed on all its samples in this many "
                  "consecutive steps and a /health re-check fails (a server answering again gets one more budget; "
                  "0: never)."},
    )
    max_reward_failure_rate: float = field(
        default=0.5,
        metadata={"help": "Stop when a reward failed on more than this fraction of its samples over the last "
                  "--reward_failure_window steps (1: never)."},
    )
    reward_failure_window: int = field(
        default=20, metadata={"help": "Steps over which --max_reward_failure_rate is measured."}
    )
    reward_step_deadline: float = field(
        default=1200.0,
        metadata={"help": "Seconds the reward phase of one step may take; a reward still running then fails its "
                  "samples for that step (0: no limit). Raise it if time/rewards is legitimately longer."},
    )
    # --- end reward failure budget ---
    # --- resume (issue 11, trainer/checkpointing.py) ---
    resume_reset_optimizer: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint saved under another world size (NNODES x NGPUS): load its weights and "
                  "LR schedule and restart AdamW's moments from zero (ZeRO optimizer states are partitioned per "
                  "process). Without it such a resume stops with an error naming both sizes."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from step 0 in an --output_dir that holds another run's checkpoints or metrics.jsonl: "
                  "its files are MOVED into <output_dir>/archived-<UTC time>/ (never deleted). Without it such a "
                  "start stops with a message (continue that run with --resume_from_checkpoint latest)."},
    )
    # --- end resume ---
    # --- divergence guard (issue 30, trainer/divergence.py) ---
    max_skipped_steps: int = field(
        default=3,
        metadata={"help": "Stop (exit 4) when this many consecutive GRPO steps applied no optimizer step (DeepSpeed's "
                  "overflow skip, a NaN loss): the weights have diverged or are about to; the message names the cause "
                  "and the last checkpoint saved before. A lone skip (one bad batch) goes on. 0: never stop."},
    )
    stall_report_s: float = field(
        default=600.0,
        metadata={"help": "Each rank writes <output_dir>/heartbeats/rank-R.json at every phase; when ranks have "
                  "waited this many seconds for one that is behind, rank 0 logs which rank stalled, on which host, "
                  "in which phase and step (and again when the run fails, e.g. at --ddp_timeout). At most half of "
                  "--ddp_timeout is used. 0: no watchdog."},
    )
    # --- end divergence guard ---
    # --- EMA of the trained modules (issue 13, trainer/ema.py) ---
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Decay d of an fp32 EMA of the trained parameters, updated after each optimizer step with "
                  "the warm-up min((1 + s) / (10 + s), d) (s = optimizer steps before it); evaluation and sample "
                  "grids then use the EMA weights, and checkpoints save it (ema.pt). 0: off (default)."},
    )
    ema_update_every: int = field(
        default=1,
        metadata={"help": "Update the EMA on every k-th optimizer step (when s, the optimizer steps before it, is a "
                  "multiple of k)."},
    )
    ema_device: EmaDevice = field(
        default="cpu",
        metadata={"help": "Where the EMA lives: 'cpu' (4 bytes per trained parameter of host memory on every rank) "
                  "or 'same' (beside the weights, e.g. on the GPU)."},
    )
    # --- end EMA ---
    # --- step pipeline (issue 12: trainer/streaming.py, trainer/sde_window.py) ---
    stream_rewards: bool = field(
        default=True,
        metadata={"help": "Score each rollout micro-batch (whole groups) as soon as it is decoded, while the next one "
                  "samples; the advantages wait only for what is still in flight (time/reward_wait). Same results "
                  "as false (serial: rollout, decode, then all rewards)."},
    )
    sde_window_size: int = field(
        default=0,
        metadata={"help": "MixGRPO / Flow-GRPO-Fast: SDE on W consecutive steps (ODE elsewhere), only those trained "
                  "(max(1, int(W x --timestep_fraction)) of them; 1.0 trains all) and only their W + 1 latents kept. "
                  "0: off (reference: every step SDE)."},
    )
    sde_window_range: Optional[str] = field(
        default=None,
        metadata={"help": "'a,b': the window start is drawn per step in [a, b - W] (one draw shared by all ranks). "
                  "Default 0,T."},
    )
    eval_before_train: bool = field(
        default=True,
        metadata={"help": "Run the UniGenBench evaluation once at step 0, before training (a fresh run's baseline; "
                  "not repeated on resume). Skipped, with a log line, when evaluation is off or no judge answers."},
    )
    # --- end step pipeline ---

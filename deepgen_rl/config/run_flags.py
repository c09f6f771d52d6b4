"""The evaluation, logging, failure-budget, resume, EMA and step-pipeline flags of
:class:`deepgen_rl.config.GRPOConfig` (a dataclass mixin: its fields join the GRPOConfig group of ``--help``;
``GRPOConfig._validate_grpo_flags`` checks them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

EmaDevice = Literal["gpu", "cpu"]  # also trainer/ema.py's
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
    replay_step: int = field(
        default=0,
        metadata={"help": "Run exactly GRPO step N of a run and stop (0: off), on any world size, to debug it: pass "
                  "the run's own flags, --resume_from_checkpoint <run>/checkpoint-<N-1> (none for N = 1) and a NEW "
                  "--output_dir (the original run is only read). Every draw of a step is keyed by global position, "
                  "so the replay sees the same prompts, noise and rewards (docs/reproducibility.md)."},
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
    # --- reward-hacking monitor (deepgen_rl/monitor/, trainer/hacking.py, docs/monitoring.md) ---
    monitor_baseline_steps: int = field(
        default=1,
        metadata={"help": "The first N steps whose rollout image statistics (brightness, saturation, contrast, high "
                  "frequency, colourfulness, JPEG bits per pixel, within-group diversity; one value per group) form "
                  "the drift baseline. 1 (default): the first step's rollout only, made by the initial policy "
                  "before any update; raise it only when one step has too few groups (< 8), knowing that a hack "
                  "learned within those steps then hides in the baseline."},
    )
    monitor_z: float = field(
        default=5.0,
        metadata={"help": "Drift alarm: a statistic's trailing 3-step mean beyond this z-score (two-sample t-test of "
                  "the groups' values against the baseline's, on the normal scale) and by over half a baseline "
                  "standard deviation, for --monitor_patience steps in a row. 0: no drift alarm."},
    )
    monitor_patience: int = field(
        default=3, metadata={"help": "Consecutive steps beyond --monitor_z before the drift alarm fires."}
    )
    monitor_eval_window: int = field(
        default=3,
        metadata={"help": "Divergence alarm: over the last N held-out evaluations the held-out score falls beyond "
                  "its standard errors (least-squares slope) while the training reward's slope is significantly "
                  "positive. 0: no divergence alarm."},
    )
    monitor_eval_metric: str = field(
        default="overall",
        metadata={"help": "The held-out score of the divergence alarm and best_checkpoint.json: 'overall' (the mean "
                  "of every eval/<dataset>/overall) or an eval metric's name, e.g. eval/unigenbench/Attribute."},
    )
    on_reward_hacking: str = field(
        default="warn",
        metadata={"help": "What an alarm does: 'warn' (console, metrics monitor/alarms, run_summary.json) or 'stop' "
                  "(also checkpoint, then exit 5 naming the alarm and best_checkpoint.json's checkpoint)."},
    )
    # --- end reward-hacking monitor ---
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
        default="gpu",
        metadata={"help": "Where the EMA lives: 'gpu' (default: sharded beside each rank's fp32 master partition "
                  "of ZeRO-2/3, 4 bytes per trained parameter / world size, averaged from the fp32 master weights "
                  "in one fused op per step; on the CPU where the optimizer is offloaded) or 'cpu' (a whole host copy "
                  "on every rank, 4 bytes per trained parameter, averaged from the 16-bit weights; not with ZeRO-3)."},
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

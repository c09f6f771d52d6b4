"""Learning yardstick on CPU: does GRPO still learn the synthetic prompt -> image task, variant by variant?

    python benchmarks/bench_learning.py                      # ~16 min on 2 CPU cores (+ pretraining, cached)
    python benchmarks/bench_learning.py --steps 10 --seeds 0 --variants cps_gdpo lr0   # a quick look
    (finished runs in --output_dir with the same flags are reused: add variants or seeds without rerunning)

Every variant trains the SAME pretrained tiny model (python -m deepgen_rl.model.tiny --pretrain_steps N, cached
under --output_dir) for the same number of steps and the same seeds, through the real entry point
(``python -m deepgen_rl.grpo_deepgen``, one process per run), on assets/rl_datasets/synthetic/synthetic.yaml with
the exact local reward synthetic_match, at the quick start's settings.

A step's batch reward depends mostly on which 4 of the 8 prompts it drew (some are far easier), so raw curves
are noisy. Runs with the same seed draw the same prompts and the same initial noise at every step, so each
variant is compared step by step with its CONTROL, the same sampling at learning rate 0 on the same seed (paired),
over the last ``TAIL`` steps. The table: final (mean batch reward of the last TAIL steps, mean over seeds) and
vs control (final minus the control's final on the same seed: mean over seeds and the smallest).
``learning_curves.png``: per run kind, the mean over seeds of the batch reward, as a trailing ``SMOOTH``-step
mean (controls dashed).

Variants: the sampler (CPS-SDE, Flow-SDE) and the advantage (GDPO, GRPO) of docs/algorithms.md#samplers; CPS-SDE + GDPO
trained on a 2-step SDE window instead of the whole trajectory; GRPO-Guard and DiffusionNFT (issue 14) at the same
learning rate (not tuned for them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "assets" / "rl_datasets" / "synthetic" / "synthetic.yaml"
REWARD_KEY = "reward/synthetic_match/mean"
TAIL = 10  # last steps compared with the control
SMOOTH = 5  # trailing mean of the plotted curves
# The quick start's run (scripts/quickstart.sh): 4 sampler steps (3 trained), 4 prompts x 8 samples per step.
BASE_FLAGS = {
    "image_height": 64, "image_width": 64, "num_inference_steps": 4, "timestep_fraction": 1.0, "rollout_n": 8,
    "global_batch_size": 32, "rollout_micro_batch_size": 32, "atrain_micro_batch_size": 32,
    "learning_rate": 5e-5, "clip_range": 1e-2, "lr_scheduler_type": "constant", "eval_freq": 0,
    "sample_image_freq": 0, "report_to": "none", "save_strategy": "no", "gradient_checkpointing": False,
    "dataset_config": str(DATASET),
}
VARIANTS = {
    "cps_gdpo": {"atrain_sde_sampler": "cps_sde", "atrain_adv_type": "gdpo"},  # the defaults
    "cps_grpo": {"atrain_sde_sampler": "cps_sde", "atrain_adv_type": "grpo"},
    "flow_gdpo": {"atrain_sde_sampler": "flow_sde", "atrain_adv_type": "gdpo"},
    "flow_grpo": {"atrain_sde_sampler": "flow_sde", "atrain_adv_type": "grpo"},
    "cps_gdpo_window2": {"atrain_sde_sampler": "cps_sde", "atrain_adv_type": "gdpo", "sde_window_size": 2},
    "grpoguard": {"atrain_algorithm": "grpoguard"},
    "diffusionnft": {"atrain_algorithm": "diffusionnft", "init_same_noise": False},
}
# Each variant's control: its own rollouts at learning rate 0. Only the sampling differs between controls (Flow-SDE
# is much noisier than CPS-SDE at 4 steps, the window samples ODE outside it, DiffusionNFT rolls out ODE with
# independent noise), so variants that sample alike share one.
CONTROL_OF = {"cps_gdpo": "lr0", "cps_grpo": "lr0", "grpoguard": "lr0", "flow_gdpo": "lr0_flow",
              "flow_grpo": "lr0_flow", "cps_gdpo_window2": "lr0_window2", "diffusionnft": "lr0_diffusionnft"}
CONTROLS = {"lr0": "cps_gdpo", "lr0_flow": "flow_gdpo", "lr0_window2": "cps_gdpo_window2",
            "lr0_diffusionnft": "diffusionnft"}
VARIANTS.update({control: {**VARIANTS[variant], "learning_rate": 0.0} for control, variant in CONTROLS.items()})


def run_flags(paths, output_dir: Path, steps: int, seed: int, overrides: dict) -> list[str]:
    """grpo_deepgen flags of one run (model flags + BASE_FLAGS + overrides)."""
    values = {**BASE_FLAGS, "max_steps": steps, "seed": seed, "output_dir": str(output_dir), **overrides}
    flags = list(paths.model_flags())
    for name, value in values.items():
        flags += [f"--{name}", str(value)]
    return flags


def read_curve(metrics: Path) -> list[float]:
    return [json.loads(line)[REWARD_KEY] for line in metrics.read_text().splitlines() if line.strip()]


def finished_curve(output_dir: Path, flags: list[str], steps: int) -> list[float] | None:
    """The reward curve of a run already finished in ``output_dir`` with exactly these flags (None otherwise):
    an interrupted benchmark, or one given more variants, reruns only what is missing."""
    record, metrics = output_dir / "bench_flags.json", output_dir / "metrics.jsonl"
    if not (record.is_file() and metrics.is_file()) or json.loads(record.read_text()) != flags:
        return None
    curve = read_curve(metrics)
    return curve if len(curve) == steps else None


def launch(paths, output_dir: Path, steps: int, seed: int, overrides: dict) -> subprocess.Popen:
    env = dict(os.environ, **paths.env(), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", SWANLAB_MODE="disabled")
    output_dir.mkdir(parents=True, exist_ok=True)
    log = (output_dir / "train.log").open("w")
    flags = run_flags(paths, output_dir, steps, seed, overrides)
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    (output_dir / "bench_flags.json").write_text(json.dumps(flags))
    command = [sys.executable, "-m", "deepgen_rl.grpo_deepgen", *flags]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def summarise(curves: dict[str, list[list[float]]]) -> list[dict]:
    """Per variant: final = mean of the last TAIL steps (mean over seeds); vs_control = final minus its control's
    on the same seed (mean over seeds, and the smallest), when that control ran."""
    rows = []
    for name, runs in curves.items():
        finals = [statistics.mean(curve[-TAIL:]) for curve in runs]
        row = {"variant": name, "final": statistics.mean(finals), "seeds": len(runs)}
        control = curves.get(CONTROL_OF.get(name, ""))
        if control:
            paired = [final - statistics.mean(curve[-TAIL:]) for final, curve in zip(finals, control)]
            row.update(control=CONTROL_OF[name], vs_control=statistics.mean(paired), vs_control_min=min(paired))
        rows.append(row)
    return rows


def plot(curves: dict[str, list[list[float]]], output: Path) -> None:
    import matplotlib

    from deepgen_rl.trainer.logging_utils import trailing_mean

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        mean = trailing_mean([statistics.mean(values) for values in zip(*runs)], SMOOTH)
        ax.plot(range(1, len(mean) + 1), mean, label=name, linestyle="--" if name in CONTROLS else "-")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"{REWARD_KEY}\n(mean over seeds, trailing {SMOOTH}-step mean)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from deepgen_rl.model.tiny import save_pretrained_tiny_deepgen
    from deepgen_rl.model.tiny_pretrain import PretrainSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_learning")
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps of every run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds of every variant.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrain_steps", type=int, default=PretrainSettings.steps)
    parser.add_argument("--pretrain_vae_steps", type=int, default=PretrainSettings.vae_steps)
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (one process each).")
    args = parser.parse_args(argv)
    if args.steps < TAIL:
        parser.error(f"--steps must be at least {TAIL} (the last {TAIL} steps are compared).")
    out = Path(args.output_dir)
    paths = save_pretrained_tiny_deepgen(out / "tiny_pretrained", PretrainSettings(steps=args.pretrain_steps,
                                                                                  vae_steps=args.pretrain_vae_steps))
    curves: dict[str, list[list[float]]] = {name: [] for name in args.variants}
    jobs = []
    for name in args.variants:
        for seed in args.seeds:
            run_dir = out / f"{name}_seed{seed}"
            curve = finished_curve(run_dir, run_flags(paths, run_dir, args.steps, seed, VARIANTS[name]), args.steps)
            if curve is None:
                jobs.append((name, seed))
            else:
                print(f"  {name} seed {seed}: reused from {run_dir}")
                curves[name].append(curve)
    start = time.perf_counter()
    while jobs:
        batch, jobs = jobs[:args.parallel], jobs[args.parallel:]
        running = [(name, seed, launch(paths, out / f"{name}_seed{seed}", args.steps, seed, VARIANTS[name]))
                   for name, seed in batch]
        for name, seed, process in running:
            if process.wait() != 0:
                raise SystemExit(f"run {name} seed {seed} failed: see {out / f'{name}_seed{seed}' / 'train.log'}")
            curves[name].append(read_curve(out / f"{name}_seed{seed}" / "metrics.jsonl"))
            print(f"  {name} seed {seed}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = summarise(curves)
    print(f"\n{args.steps} GRPO steps, seeds {args.seeds}. final: mean {REWARD_KEY} of the last {TAIL} steps (mean "
          f"over seeds); vs control: final minus its lr-0 control's on the same seed (same prompts and rollout "
          f"noise), mean and min over seeds")
    print(f"{'variant':<18} {'final':>7} {'control':<18} {'vs control':>10} {'min':>8}")
    for row in rows:
        paired = (f" {row['control']:<18} {row['vs_control']:+10.4f} {row['vs_control_min']:+8.4f}"
                  if "control" in row else "")
        print(f"{row['variant']:<18} {row['final']:7.4f}{paired}")
    (out / "results.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    plot(curves, out / "learning_curves.png")
    print(f"\ncurves: {out / 'learning_curves.png'}; numbers: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

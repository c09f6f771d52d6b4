"""GPU check: the real training path on one CUDA device, measured and JUDGED (exit 1 when a check fails).

One call answers what a short GPU window must: the REAL-size DeepGen model in bf16 (random weights written in the
published layout, UniPic2's ``SD3Transformer2DKontextModel``, a CHECKPOINT with an LLM LoRA; loaded back through
``load_deepgen_model``: benchmarks/gpu_check_setup.py) trained by the trainer's own entry point
(``grpo_deepgen.build_trainer`` + ``trainer.train()``, DeepSpeed ZeRO-2, world size 1) at the guide's settings:

    train    2 GRPO steps: 512^2, cps_sde, 50 steps (30 trained), 4 prompts x 8 = 32 images, reference optimizer-step
             schedule, beta 5e-7 (reference DiT copy), SFT-aux 1e-4 on the built-in images, rewards streamed to a
             stand-in OCR-contract server on 127.0.0.1, EMA on, gradient checkpointing
    eval     the periodic evaluation after step 2: 4 prompts, stand-in UniGenBench judge on 127.0.0.1
    save     the real-size checkpoint after step 1 (only that one: a ZeRO-2 checkpoint of the 2.24 B DiT with its
             fp32 master weights, Adam states and EMA is ~40 GB; beside the ~18 GB model folders, a 64 GiB disk
             holds one, so the run's end-of-run save is skipped)
    resume   a new trainer resumes from it and redoes step 2: its metrics and fp32 weights must match the run's
    convert  the converter (model/convert.py) on that checkpoint, read back with the CHECKPOINT loader
    edit     one edit step (Kontext: a source image per prompt, the vision tower kept), 8 images, 20 steps
    rollout  (alone: one rollout + rewards of a fresh trainer, no update; it is part of every train step)

Printed: seconds, TFLOP/s and MFU of each phase (compute model: gpu_check_setup.py), peak GPU memory per phase
against the memory estimator (deepgen_rl/estimate_memory.py), the first-chunk ratio deviation. Exit 1 when a
loss or trained weight is non-finite or a step was skipped, the first-chunk deviation exceeds --max_ratio_dev, a
phase's peak memory exceeds the estimator's figure by more than 15 %, the resumed step differs, the evaluation or
conversion failed, or the whole check overran --budget_s.

    python benchmarks/gpu_check.py                          # on the GPU machine: scripts/gpu_check.sh
    python benchmarks/gpu_check.py --only edit,convert       # a part (and what it needs: convert -> save -> train)
    python benchmarks/gpu_check.py --smoke                  # the same sequence, tiny parts, bf16, on the CPU
    python benchmarks/gpu_check.py --smoke --inject_fault nan_loss   # must exit 1 (also: ratio)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_setup as setup  # noqa: E402  (beside this file)
from gpu_check_judge import Check, estimate, estimated_peaks, report  # noqa: E402
from gpu_check_runs import (Context, run_convert, run_edit, run_eval_only, run_resume, run_rollout_only,  # noqa: E402
                            run_train)

REPO_ROOT = setup.REPO_ROOT
PHASES = ("rollout", "train", "eval", "save", "resume", "convert", "edit")
NEEDS = {"save": ("train",), "resume": ("save",), "convert": ("save",)}


def expand_only(only: str) -> list[str]:
    """--only names plus what they need, in the order they run."""
    chosen = set(PHASES) if not only else {name.strip() for name in only.split(",") if name.strip()}
    unknown = chosen - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    for name in list(chosen):
        stack = list(NEEDS.get(name, ()))
        while stack:
            need = stack.pop()
            chosen.add(need)
            stack.extend(NEEDS.get(need, ()))
    return [name for name in PHASES if name in chosen]


def run_check(settings: setup.CheckSettings, parts: list[str], *, fault: str = "", max_ratio_dev: float,
              budget_s: float, peak_tflops: float, out_dir: str = "", since_process_start: bool = False) -> int:
    """Everything in ``parts`` (see the module docstring); prints the figures, returns the exit code.
    ``since_process_start``: the budget's clock started with the process (the command line), not here."""
    from tests.reward_servers import fake_server
    from tests.servers.fake_judge import FakeJudge

    check = Check(torch.device("cpu" if settings.smoke else "cuda:0"), since_process_start=since_process_start)
    created_group = init_single_process(cuda=not settings.smoke)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder, fake_server() as reward, \
                FakeJudge(rule="name", pass_dims="Style", served_model_name=setup.JUDGE_MODEL) as judge:
            root = Path(folder)
            require_disk(root, settings, parts)
            with check.phase("write model"):
                paths, model_flags = setup.write_random_model(root / "model", settings, check.device)
            release_memory(check)
            ctx = Context(settings, root, paths, model_flags, setup.write_data(root / "data", settings), reward.url,
                          judge.url, fault, max_ratio_dev)
            run = {}
            if "train" in parts:
                run = run_train(ctx, check, parts)
            elif "rollout" in parts:
                run = run_rollout_only(ctx, check)
            release_memory(check)
            if "eval" in parts and "train" not in parts:
                run_eval_only(ctx, check)
                release_memory(check)
            if "resume" in parts:
                run_resume(ctx, check, run)
                release_memory(check)
            if "convert" in parts:
                run_convert(ctx, check, run)
            if "edit" in parts:
                run_edit(ctx, check)
            limits = {}
            if run:
                with check.phase("estimator"):
                    limits = estimated_peaks(estimate(run["model_args"], run["args"]))
    finally:
        if created_group:
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
    total = time.perf_counter() - check.started
    device = torch.cuda.get_device_name(0) if check.device.type == "cuda" else "CPU"
    print(f"gpu_check: {'tiny (smoke)' if settings.smoke else 'real-size'} DeepGen on {device}: "
          f"{settings.images} images at {settings.image_size}^2, {settings.steps} steps; parts {','.join(parts)}")
    if run:
        print(f"  weights {run['model_args'].model_dtype}, gradient checkpointing "
              f"{'on' if run['args'].gradient_checkpointing else 'off'}, EMA decay {run['args'].ema_decay}, "
              f"SFT-aux {run['args'].sftaux_coef}, streamed rewards {run['args'].stream_rewards}")
    report(check, run.get("flops", {}), limits, peak_tflops)
    print(f"  total {total:.1f} s{' since the process started' if since_process_start else ''} "
          f"(budget {budget_s:.0f} s)")
    if total > budget_s:
        check.fail(f"the check took {total:.0f} s, over its {budget_s:.0f} s budget")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "gpu_check.json").write_text(json.dumps(
            {"device": device, "parts": parts, "total_s": total, "phases": check.records, "failures": check.failures,
             "steps": [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in run.get("history", [])]},
            indent=1, default=str))
    print("gpu_check: PASSED" if not check.failures else f"gpu_check: FAILED ({len(check.failures)}): "
          + "; ".join(check.failures))
    return 0 if not check.failures else 1


def release_memory(check: Check) -> None:
    """Collect what the last part left and say how much GPU memory is still held (the next part needs it all)."""
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(check.device) / 2**30
        if held > 1.0:
            print(f"  note: {held:.1f} GiB of GPU memory still allocated after releasing the last part")


# Disk a real-size check writes: the model folders (~18 GB: Qwen2.5-VL 7.5, DiT 4.5, CHECKPOINT 5.5 with the LoRA)
# and, with "save", checkpoint-1 (~41 GB: bf16 DiT 4.5, fp32 master + Adam m and v 27, fp32 EMA 9) and the
# converted .pth (4.5 GB, removed once read back).
REAL_DISK_GB = {"model": 18.0, "save": 41.0, "convert": 4.5}


def require_disk(root: Path, settings: setup.CheckSettings, parts: list[str]) -> None:
    """Fail early, naming the folder and the way out, when the disk cannot hold what the check writes."""
    if settings.smoke:
        return
    import shutil

    need = REAL_DISK_GB["model"] + sum(REAL_DISK_GB[p] for p in ("save", "convert") if p in parts)
    free = shutil.disk_usage(root).free / 1e9
    print(f"  disk: {free:.0f} GB free under {root.parent}, the check writes ~{need:.0f} GB")
    if free < need:
        raise SystemExit(f"gpu_check: {root.parent} has {free:.0f} GB free, the check needs ~{need:.0f} GB: point "
                         "TMPDIR at a larger disk, or leave the checkpoint out (--only rollout,train,eval,edit).")


def init_single_process(cuda: bool) -> bool:
    """A one-rank process group (DeepSpeed needs one): nccl on cuda:0, gloo on the CPU; reuses a live one.
    Returns whether the group was created here."""
    import deepspeed
    import torch.distributed as dist

    from deepgen_rl import grpo_deepgen

    if cuda:
        torch.cuda.set_device(0)
    created = not dist.is_initialized()
    if created:
        grpo_deepgen.ensure_single_process_env(os.environ)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if dist.get_world_size() != 1:
        raise RuntimeError("gpu_check runs on ONE device: start it with python, not torchrun.")
    return created


def default_clip_range() -> float:
    """--clip_range's default (the check's runs leave it there)."""
    from deepgen_rl.config.grpo_flags import ObjectiveFlags

    return next(f.default for f in dataclasses.fields(ObjectiveFlags) if f.name == "clip_range")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny parts, bf16, on the CPU (the same sequence).")
    parser.add_argument("--only", default="", help=f"Comma-separated parts of {','.join(PHASES)} (default: all); "
                        "the parts they need run too.")
    parser.add_argument("--inject_fault", choices=("", "nan_loss", "ratio"), default="",
                        help="Make a check fail on purpose: a NaN loss, or the policy moved between rollout and "
                             "training (first-chunk ratio != 1).")
    parser.add_argument("--max_ratio_dev", type=float, default=None,
                        help="Bound of max |ratio - 1| at each step's first chunk, where the policy is still the one "
                             "that rolled out. Default: 10%% of the default --clip_range (1e-5): a first chunk off by "
                             "the clip range has its samples clipped, i.e. no policy gradient.")
    parser.add_argument("--budget_s", type=float, default=None, help="Seconds the whole check may take "
                        "(default: 480 on the GPU; 1200 for --smoke, whose CPU time depends on the machine).")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="The device's dense bf16 peak for MFU (H100 SXM: 989).")
    parser.add_argument("--out", default=os.environ.get("OUT", ""),
                        help="Folder for gpu_check.json (default: $OUT when set).")
    cli = parser.parse_args(argv)
    parts = expand_only(cli.only)
    # Warnings from everything; from the loader also its CHECKPOINT summary (LoRA pairs merged, keys loaded).
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s %(name)s %(levelname)s] %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("deepgen_rl.model.checkpoint_loading").setLevel(logging.INFO)
    # Children (the stand-in servers) import the package from this checkout, also where it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    settings = setup.SMOKE if cli.smoke else setup.REAL
    if cli.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to check (run it on a GPU machine, or --smoke on the CPU).")
        return 0
    max_ratio_dev = cli.max_ratio_dev if cli.max_ratio_dev is not None else 0.1 * default_clip_range()
    budget_s = cli.budget_s if cli.budget_s is not None else (1200.0 if cli.smoke else 480.0)
    try:
        return run_check(settings, parts, fault=cli.inject_fault, max_ratio_dev=max_ratio_dev, budget_s=budget_s,
                         peak_tflops=cli.peak_tflops, out_dir=cli.out, since_process_start=argv is None)
    except torch.cuda.OutOfMemoryError as err:
        print(f"gpu_check: FAILED: out of GPU memory (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB): {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

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
from gpu_check_judge import (Check, estimate, estimated_peaks, judge_coverage, judge_resume, judge_steps,  # noqa: E402
                             judge_weights, report)

REPO_ROOT = setup.REPO_ROOT
PHASES = ("rollout", "train", "eval", "save", "resume", "convert", "edit")
NEEDS = {"save": ("train",), "resume": ("save",), "convert": ("save",)}
PROBED = ("rollout_phase", "decode_phase", "reward_phase", "train_phase", "eval_phase", "save", "load")


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


def probe(trainer, check: Check, run: str, fault: str = "") -> None:
    """Wrap the trainer's phase methods (instance attributes shadow the class's) to time them and read their
    memory; ``fault`` injects a NaN loss or a weight change between rollout and training (the check must fail)."""
    for name in PROBED:
        original = getattr(trainer, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            after_step = _name in ("save", "load", "eval_phase")  # these run after (or resume at) global_step
            with check.phase(f"{run}:{_name.removesuffix('_phase')}", trainer.state.global_step + (not after_step)):
                return _original(*args, **kwargs)

        setattr(trainer, name, timed)
    if fault == "nan_loss":
        objective = trainer._chunk_objective

        def nan_objective(*args, **kwargs):
            result = objective(*args, **kwargs)
            nan = float("nan")
            return dataclasses.replace(result, loss=result.loss * nan, policy_term=result.policy_term * nan,
                                       policy_loss=nan)

        trainer._chunk_objective = nan_objective
    elif fault == "ratio":
        train_phase = trainer.train_phase

        def moved_then_train(*args, **kwargs):
            with torch.no_grad():  # the policy no longer is the one that rolled out: ratio != 1 at the first chunk
                trainer.model.transformer.proj_out.weight.mul_(1.5)
            return train_phase(*args, **kwargs)

        trainer.train_phase = moved_then_train


def save_once(trainer) -> None:
    """Only the first checkpoint is written (see the module docstring: the disk holds one real-size checkpoint)."""
    save = trainer.save

    def first_only():
        if trainer._last_saved_step is None:
            return save()
        print(f"  (checkpoint of step {trainer.state.global_step} not written: the check keeps one)")
        return None

    trainer.save = first_only


def fp32_params(trainer):
    """(name, fp32 master weight on the CPU) of each trained parameter, one at a time (DeepSpeed's public
    accessor; at real size all of them are 9 GB, so callers keep only what they need)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            yield name, (full if full is not None else param.detach()).float().cpu()


def build(flags: list[str], device: torch.device):
    """The entry point's own trainer from these flags; returns (trainer, GRPOConfig, ModelArguments)."""
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args

    args, model_args, *groups = parse_args(flags)
    trainer = grpo_deepgen.build_trainer(args, model_args, *groups, "cpu" if device.type == "cpu" else "cuda:0")
    return trainer, args, model_args


def teardown(trainer) -> None:
    """Close and drop a trainer so that the next one has the GPU to itself."""
    trainer.close()
    destroy = getattr(trainer.engine, "destroy", None)
    if destroy is not None:
        destroy()
    trainer.__dict__.clear()


def release_memory(check: Check) -> None:
    """Collect what the last part left and say how much GPU memory is still held (the next part needs it all)."""
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(check.device) / 2**30
        if held > 1.0:
            print(f"  note: {held:.1f} GiB of GPU memory still allocated after releasing the last part")


@dataclasses.dataclass
class Context:
    """Where the check's files and servers are, and what the runs share."""

    settings: setup.CheckSettings
    root: Path
    paths: object
    model_flags: dict
    data: dict
    reward_url: str
    judge_url: str
    fault: str
    max_ratio_dev: float

    def flags(self, out: str, **kwargs) -> list[str]:
        return setup.run_flags(self.settings, self.paths, self.model_flags, self.data, self.root / out,
                               self.reward_url, self.judge_url, **kwargs)


def flops_of(trainer, args) -> dict[str, float]:
    """Compute-model FLOPs of one GRPO step's rollout and train phases (gpu_check_setup.py)."""
    from deepgen_rl.rl.timesteps import num_train_steps

    model = trainer.model
    per_forward = setup.dit_forward_flops(model.transformer, model.num_queries, args.image_height)
    return setup.phase_flops(per_forward, args.global_batch_size, args.num_inference_steps,
                             num_train_steps(args.num_inference_steps, args.timestep_fraction),
                             checkpointing=bool(args.gradient_checkpointing), reference=args.beta > 0)


def run_rollout_only(ctx: Context, check: Check) -> dict:
    """A fresh trainer's rollout and rewards (no update)."""
    trainer, args, model_args = build(ctx.flags("rollout", evaluate=False), check.device)
    try:
        probe(trainer, check, "rollout")
        batch = trainer.rollout_phase(0)
        if batch.rewards_in_flight is None:
            trainer.decode_phase(batch)
        rewards = trainer.reward_phase(batch)
        if not torch.isfinite(rewards.scores).any():
            check.fail("rollout: no sample got a finite reward")
        return {"args": args, "model_args": model_args, "flops": flops_of(trainer, args)}
    finally:
        teardown(trainer)


def run_train(ctx: Context, check: Check, parts: list[str]) -> dict:
    """Run A: 2 GRPO steps (+ the evaluation after step 2, + the checkpoint after step 1), judged."""
    flags = ctx.flags("run", evaluate="eval" in parts)
    if "save" not in parts:
        flags += ["--save_strategy", "no"]
    trainer, args, model_args = build(flags, check.device)
    try:
        probe(trainer, check, "run", ctx.fault)
        save_once(trainer)
        trainer.train()
        history = [dict(record) for record in trainer.state.log_history]
        weights = dict(fp32_params(trainer))
        flops = flops_of(trainer, args)
    finally:
        teardown(trainer)
    judge_steps(check, history, "run", ctx.max_ratio_dev)
    judge_coverage(check, history, ctx.root / "run" / "checkpoint-1" if "save" in parts else None)
    judge_weights(check, weights.items(), "run")
    if "eval" in parts:
        evaluated = next((r for r in history if any(k.startswith("eval/") for k in r)), {})
        summary = {k: v for k, v in evaluated.items() if k.startswith("eval/")}
        if evaluated.get("eval/failed") or evaluated.get("eval/complete") != 1.0:
            check.fail(f"evaluation did not complete: {summary}")
        else:
            print(f"  evaluation at step {evaluated['step']}: {summary}")
    return {"history": history, "weights": weights, "args": args, "model_args": model_args, "flops": flops,
            "checkpoint": ctx.root / "run" / "checkpoint-1"}


def run_eval_only(ctx: Context, check: Check) -> None:
    """The periodic evaluation of a fresh trainer's weights (when --only names eval without train)."""
    trainer, *_ = build(ctx.flags("eval", evaluate=True), check.device)
    try:
        probe(trainer, check, "run")
        metrics = trainer.eval_phase(0)
    finally:
        teardown(trainer)
    if metrics.get("eval/failed") or metrics.get("eval/complete") != 1.0:
        check.fail(f"evaluation did not complete: {metrics}")


def run_resume(ctx: Context, check: Check, run: dict) -> None:
    """Run B: a new trainer resumes from checkpoint-1 and redoes step 2; it must match run A's step 2. Keeps
    checkpoint-1's weights in bf16 (``run["checkpoint_bf16"]``) for the converter's check."""
    flags = ctx.flags("resumed", evaluate=False) + ["--save_strategy", "no"]
    trainer, *_ = build(flags, check.device)
    norms = {"update": 0.0, "error": 0.0}
    run["checkpoint_bf16"] = {}
    try:
        probe(trainer, check, "resumed", ctx.fault)
        load = trainer.load

        def load_and_measure(path):
            load(path)
            for name, loaded in fp32_params(trainer):  # step 2's update |w_run - w_checkpoint|, summed per tensor
                norms["update"] += float((run["weights"][name] - loaded).double().pow(2).sum())
                run["checkpoint_bf16"][name] = loaded.to(torch.bfloat16)

        trainer.load = load_and_measure
        trainer.train(resume_from_checkpoint=str(run["checkpoint"]))
        history = [dict(record) for record in trainer.state.log_history]
        for name, resumed in fp32_params(trainer):
            norms["error"] += float((run["weights"][name] - resumed).double().pow(2).sum())
    finally:
        teardown(trainer)
    redone = [record for record in history if record["step"] > 1]  # the state's history holds step 1's record too
    judge_steps(check, redone, "resumed", ctx.max_ratio_dev)
    judge_resume(check, run["history"], redone, norms["update"] ** 0.5, norms["error"] ** 0.5)


def run_convert(ctx: Context, check: Check, run: dict) -> None:
    """The converter on checkpoint-1 (bf16 output: the trained weights as the checkpoint's model states hold
    them), read back by the CHECKPOINT loader: every trained tensor, finite, equal to checkpoint-1's."""
    from deepgen_rl.model.checkpoint_loading import read_checkpoint
    from deepgen_rl.model.convert import convert_rl_checkpoint

    output = ctx.root / "converted" / "rl.pth"
    with check.phase("convert"):
        summary = convert_rl_checkpoint(run["checkpoint"], output, dtype="bfloat16")
        state = read_checkpoint(output)
    output.unlink()  # ~4.5 GB at real size; the disk is full enough
    expected = run.get("checkpoint_bf16") or {}  # read by the resume part; without it only presence is checked
    print(f"  convert: {summary.num_tensors} tensors, {summary.num_parameters / 1e9:.3f} B parameters, "
          f"prefixes {summary.prefix_counts}")
    names = set(expected) or {name for name in run["weights"]}
    missing = sorted(names - set(state))
    if missing:
        check.fail(f"converted checkpoint lacks {len(missing)} trained tensors (first: {missing[0]})")
    bad = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
    if bad:
        check.fail(f"converted checkpoint has non-finite tensors (first: {bad[0]})")
    differing = [name for name, value in expected.items()
                 if name in state and not torch.allclose(state[name].float(), value.float(), rtol=2.0 ** -7, atol=0)]
    if differing:
        check.fail(f"converted {differing[0]} (and {len(differing) - 1} more) is not checkpoint-1's weight")


def run_edit(ctx: Context, check: Check) -> None:
    """One edit step (Kontext: the source image as reference tokens; the vision tower stays)."""
    trainer, *_ = build(ctx.flags("edit", evaluate=False, edit=True), check.device)
    try:
        probe(trainer, check, "edit", ctx.fault)
        if getattr(trainer.model.lmm.model, "visual", None) is None:
            check.fail("edit: the vision tower was dropped")
        trainer.train()
        history = [dict(record) for record in trainer.state.log_history]
        judge_weights(check, fp32_params(trainer), "edit")
    finally:
        teardown(trainer)
    judge_steps(check, history, "edit", ctx.max_ratio_dev)


def run_check(settings: setup.CheckSettings, parts: list[str], *, fault: str = "", max_ratio_dev: float,
              budget_s: float, peak_tflops: float, out_dir: str = "") -> int:
    """Everything in ``parts`` (see the module docstring); prints the figures, returns the exit code."""
    from tests.reward_servers import fake_server
    from tests.servers.fake_judge import FakeJudge

    check = Check(torch.device("cpu" if settings.smoke else "cuda:0"))
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
    print(f"  total {total:.1f} s (budget {budget_s:.0f} s)")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny parts, bf16, on the CPU (the same sequence).")
    parser.add_argument("--only", default="", help=f"Comma-separated parts of {','.join(PHASES)} (default: all); "
                        "the parts they need run too.")
    parser.add_argument("--inject_fault", choices=("", "nan_loss", "ratio"), default="",
                        help="Make a check fail on purpose: a NaN loss, or the policy moved between rollout and "
                             "training (first-chunk ratio != 1).")
    parser.add_argument("--max_ratio_dev", type=float, default=None,
                        help="Bound of max |ratio - 1| at each step's first chunk (rollout and training share the "
                             "sampler arithmetic). Default: 1e-2 (bf16 real size), 1e-3 (smoke).")
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
    max_ratio_dev = cli.max_ratio_dev if cli.max_ratio_dev is not None else (1e-3 if cli.smoke else 1e-2)
    budget_s = cli.budget_s if cli.budget_s is not None else (1200.0 if cli.smoke else 480.0)
    try:
        return run_check(settings, parts, fault=cli.inject_fault, max_ratio_dev=max_ratio_dev, budget_s=budget_s,
                         peak_tflops=cli.peak_tflops, out_dir=cli.out)
    except torch.cuda.OutOfMemoryError as err:
        print(f"gpu_check: FAILED: out of GPU memory (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB): {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

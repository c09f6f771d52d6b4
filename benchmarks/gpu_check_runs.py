"""The runs of benchmarks/gpu_check.py: each part drives a trainer built by the entry point's own
``grpo_deepgen.build_trainer`` from the check's flags, with its phase methods wrapped to time them and read their
GPU memory (``probe``), then judges what the run left (gpu_check_judge.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import gpu_check_setup as setup  # beside this file (gpu_check.py puts the folder on sys.path)
from gpu_check_judge import Check, judge_coverage, judge_resume, judge_steps, judge_weights

PROBED = ("rollout_phase", "decode_phase", "reward_phase", "train_phase", "eval_phase", "save", "load")


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
        probe(trainer, check, "run")  # judged as the run's rollout
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

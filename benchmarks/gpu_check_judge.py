"""The judging half of benchmarks/gpu_check.py: the figures each phase leaves, what passes, and the printed table.

Bounds, and why:
* first-chunk ratio: max |ratio - 1| of each step's first chunk, where the policy is still the one that rolled out
  (gpu_check.py's --max_ratio_dev);
* memory: each phase's peak (torch.cuda.max_memory_allocated from a reset at the phase's start) against the memory
  estimator's static part plus that phase's transient, x MEMORY_MARGIN;
* resume: the tolerances below.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

MEMORY_MARGIN = 1.15
# Resume tolerances. Step metrics: 5 bf16 ulps relative (2^-8 each), for GPU kernels whose sums are not ordered
# (CPU runs match exactly). Weights: the resumed run's fp32 master weights may differ from the run's by at most
# 5 % of step 2's own update (a resume that lost the optimizer state, an RNG or a sampler position is off by ~100 %).
RESUME_METRICS = ("reward/mean", "adv/std", "loss/policy", "loss/kl", "loss/sft", "train/grad_norm")
RESUME_REL, RESUME_ABS, RESUME_WEIGHT_RATIO = 5 * 2.0 ** -8, 1e-6, 0.05


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (psutil, a DeepSpeed requirement; 0 when it is missing)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    return max(0.0, time.time() - psutil.Process().create_time())


class Check:
    """Collects figures and failures; ``fail`` records a failed check (the exit code is 1 when any did)."""

    def __init__(self, device: torch.device, *, since_process_start: bool = False) -> None:
        self.device, self.records, self.failures, self.figures = device, [], [], {}
        # From the command line the budget counts the imports too; called in a longer process, from here.
        self.started = time.perf_counter() - (seconds_since_process_start() if since_process_start else 0.0)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"  FAIL {message}")

    @contextlib.contextmanager
    def phase(self, name: str, step: int = 0):
        """Times ``name`` and reads its peak GPU memory (from zero: the peak within this phase)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            peak = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.records.append({"phase": name, "step": step, "seconds": time.perf_counter() - started,
                                 "peak_gib": peak})


def judge_steps(check: Check, history: list[dict], label: str, max_ratio_dev: float) -> None:
    for record in history:
        if "train/step_applied" not in record:
            continue  # e.g. an evaluation-only record
        step = record["step"]
        losses = {k: v for k, v in record.items() if k.startswith("loss/") and isinstance(v, (int, float))}
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            check.fail(f"{label} step {step}: non-finite {', '.join(bad)}")
        if record["train/step_applied"] != 1.0:
            check.fail(f"{label} step {step}: the optimizer step was skipped (non-finite loss or gradient)")
        deviation = record.get("policy/first_chunk_ratio_max_dev", float("nan"))
        print(f"  {label} step {step}: first-chunk ratio max dev {deviation:.3g} (bound {max_ratio_dev:g}), "
              f"reward {record.get('reward/mean', float('nan')):.4f}, loss {record.get('loss/total', float('nan')):.4g}")
        if not deviation <= max_ratio_dev:
            check.fail(f"{label} step {step}: first-chunk ratio deviation {deviation:.3g} > {max_ratio_dev:g}")


def judge_weights(check: Check, weights, label: str) -> None:
    """``weights``: (name, tensor) pairs of the trained parameters; each must be finite."""
    bad = [name for name, tensor in weights if not torch.isfinite(tensor).all()]
    if bad:
        check.fail(f"{label}: non-finite trained weights in {len(bad)} tensors (first: {bad[0]})")


def judge_coverage(check: Check, history: list[dict], checkpoint) -> None:
    """The run did what the check claims: SFT-aux in the loss, rewards streamed, EMA saved with the checkpoint."""
    steps = [record for record in history if "train/step_applied" in record]
    if not all("loss/sft" in record for record in steps):
        check.fail("run: no SFT-aux loss (loss/sft) in the step metrics")
    if not all("time/reward_wait" in record for record in steps):
        check.fail("run: rewards were not streamed (no time/reward_wait)")
    if checkpoint is not None and not (checkpoint / "ema.pt").is_file():
        check.fail(f"run: {checkpoint} has no ema.pt (EMA off?)")


def judge_resume(check: Check, history: list[dict], resumed: list[dict], update: float, error: float) -> None:
    """Step 2 redone from checkpoint-1 against the uninterrupted run's step 2: its metrics, and the distance of
    its fp32 weights from the run's (``error``) against the size of step 2's own update (``update``)."""
    mine = next((r for r in resumed if r["step"] == 2), {})
    theirs = next(r for r in history if r["step"] == 2)
    for key in RESUME_METRICS:
        a, b = theirs.get(key, float("nan")), mine.get(key, float("nan"))
        if not abs(a - b) <= RESUME_ABS + RESUME_REL * abs(a):
            check.fail(f"resumed step 2 differs: {key} {b!r} vs {a!r} in the uninterrupted run")
    ratio = error / update if update > 0 else float("inf")
    print(f"  resume: |w_resumed - w_run| = {error:.3g}, step 2's update |w_run - w_checkpoint| = {update:.3g}, "
          f"ratio {ratio:.3g} (bound {RESUME_WEIGHT_RATIO})")
    if not ratio <= RESUME_WEIGHT_RATIO:
        check.fail(f"resumed step 2's weights differ from the run's by {ratio:.3g} of its update")


def estimate(model_args, args):
    """The memory estimator's figures for this run (its model on the meta device, from the same folders)."""
    from deepgen_rl.estimate_memory import estimate_memory

    try:
        return estimate_memory(model_args, args, num_gpus=1, zero_stage=2)
    except Exception as err:  # the check's own figures still count; the report says why there is no comparison
        print(f"  memory estimator failed: {type(err).__name__}: {err}")
        return None


def estimated_peaks(result) -> dict[str, float]:
    """GiB the estimator allows per probed phase: the static part plus that phase's transient."""
    if result is None:
        return {}
    static = sum(result.components[name] for name in result.static)
    transient = {name.split(",")[0]: result.components[name] for name in result.transients}
    rollout = max(transient.get("rollout forward", 0), transient.get("VAE decode", 0))  # decode streams in rollout
    gib = 2.0 ** 30
    return {"rollout": (static + rollout) / gib, "decode": (static + transient.get("VAE decode", 0)) / gib,
            "train": (static + transient.get("train chunk activations", 0)) / gib, "overall": result.total_bytes / gib}


def report(check: Check, flops: dict, limits: dict[str, float], peak_tflops: float) -> None:
    """One line per probed phase call; judges the memory of the run's rollout and train phases."""
    print(f"{'phase':<22}{'step':>5}{'seconds':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'estimate':>10}")
    for record in check.records:
        run, _, phase = record["phase"].partition(":")
        work = flops.get(phase) if run == "run" else None
        tflops = work / record["seconds"] / 1e12 if work and record["seconds"] > 0 else None
        limit = limits.get(phase) if run in ("run", "resumed") else None
        peak = record["peak_gib"]
        print(f"{record['phase']:<22}{record['step']:>5}{record['seconds']:>10.2f}"
              f"{'' if tflops is None else f'{tflops:.1f}':>10}{'' if tflops is None else f'{tflops / peak_tflops:.1%}':>8}"
              f"{'' if peak is None else f'{peak:.2f}':>10}{'' if limit is None else f'{limit:.2f}':>10}")
        record.update(tflops=tflops, estimate_gib=limit)
        if peak is not None and limit is not None and peak > MEMORY_MARGIN * limit:
            check.fail(f"{record['phase']} step {record['step']}: peak {peak:.2f} GiB > estimator {limit:.2f} GiB "
                       f"x {MEMORY_MARGIN}")

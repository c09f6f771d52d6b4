"""First training chunk's ratio deviation in bf16 when the training chunk differs from the rollout micro-batch.

The first training chunk of a GRPO step recomputes the recorded transition under the very weights that sampled it,
so its ratio exp(log_prob - old_log_prob) should be 1 to fp32 rounding. In bf16 a DiT forward's result depends on
how many rows it runs at once (the kernels block and reduce differently), so a chunk of a different size than the
rollout's forward moves the log-prob by far more than fp32 rounding. This script rolls out N samples in one
micro-batch of N on the tiny DeepGen model in bf16 and, for each chunk size n = 1..N, recomputes the first chunk
(rows 0..n-1) at every SDE step the way training does and prints max |ratio - 1| over those rows and steps.

Two columns: "micro-batch forward" records with one forward per rollout micro-batch (what the trainer did before
``SamplerSettings.forward_rows``); "chunk forward" records as the trainer now does, with forwards of
min(chunk, micro-batch) rows (``BatchPlan.forward_rows``), and also times each rollout (process CPU seconds).

    python benchmarks/bench_first_chunk.py                 # the table, bf16, --rollout_micro 8
    python benchmarks/bench_first_chunk.py --cfg 4.0       # with CFG (the negative doubles every forward)
    python benchmarks/bench_first_chunk.py --dtype float32 # the same in fp32 (0 or fp32 rounding)
"""

from __future__ import annotations

import argparse
import time

import torch

from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
from deepgen_rl.sampling.rollout import recompute_step, rollout


def first_chunk_deviation(model, trajectory, chunk: int) -> float:
    """max |exp(recomputed - recorded) - 1| over rows 0..chunk-1 and every recorded (SDE) step."""
    worst = 0.0
    with torch.no_grad():
        for step in range(trajectory.log_probs.shape[1] - 1):  # the last step (s' = 0) is never trained
            current = recompute_step(model, trajectory, step, slice(0, chunk))
            old = trajectory.log_probs[:chunk, step]
            worst = max(worst, float((torch.exp(current.log_prob.float() - old.float()) - 1.0).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout_micro", type=int, default=8, help="Rollout micro-batch (= N samples here).")
    parser.add_argument("--steps", type=int, default=6, help="Denoising steps T.")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cfg", type=float, default=0.0, help="--rollout_cfg_scale.")
    parser.add_argument("--clip_range", type=float, default=1e-4, help="To express the deviation as a share.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_tiny_deepgen(seed=0).to(getattr(torch, args.dtype))
    prompts = ["a red circle", "a blue square"]
    group = args.rollout_micro // len(prompts)

    def sample(forward_rows):
        start = time.process_time()
        trajectory = rollout(model, prompts, group_size=group, sampler="cps_sde", eta=1.0,
                             logprob_variant="reference", num_inference_steps=args.steps, height=TINY_IMAGE_SIZE,
                             width=TINY_IMAGE_SIZE, cfg_scale=args.cfg, init_same_noise=False,
                             generator=torch.Generator().manual_seed(0), micro_batch_size=args.rollout_micro,
                             forward_rows=forward_rows)
        return trajectory, time.process_time() - start

    whole, whole_s = sample(None)
    print(f"dtype {args.dtype}, rollout micro-batch {args.rollout_micro}, T {args.steps}, cfg {args.cfg}, "
          f"clip_range {args.clip_range:g}")
    print("chunk  micro-batch forward (share of clip)  chunk forward (share)  rollout CPU s (micro-batch: "
          f"{whole_s:.2f})")
    for chunk in range(1, args.rollout_micro + 1):
        before = first_chunk_deviation(model, whole, chunk)
        chunked, seconds = sample(min(chunk, args.rollout_micro))
        after = first_chunk_deviation(model, chunked, chunk)
        print(f"{chunk:5d}  {before:11.3e} ({before / args.clip_range:6.1%})        {after:11.3e} "
              f"({after / args.clip_range:6.1%})  {seconds:6.2f}")


if __name__ == "__main__":
    main()

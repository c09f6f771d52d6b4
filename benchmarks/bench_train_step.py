"""Training-chunk overhead: our GRPO chunk vs a bare forward + backward of the same DiT calls on the same chunk.

Ours is exactly what the trainer runs per chunk (deepgen_rl.trainer.objective.policy_chunk_objective): recompute
the velocity of the recorded x_t through ``model.predict_velocity``, the CPS log-prob of the recorded transition,
the clipped-ratio loss, the reference policy's velocity (a frozen copy of the DiT, no grad) and the v-based KL,
then backward. The bare yardstick makes the same two DiT calls on the same inputs (the policy DiT with grad,
the reference DiT without) and backpropagates a plain mean of the velocity. Both use plain autograd (the
DeepSpeed engine's backward is the same for any loss and is left out).

Repeats are interleaved (AB, BA, ...), timed in process CPU time on one thread (robust on a shared machine);
the ratio is the median of per-repeat ratios.

    python benchmarks/bench_train_step.py          # prints `ratio: <ours/bare>` (target <= 1.10)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
from deepgen_rl.sampling import rollout
from deepgen_rl.trainer.objective import ObjectiveSettings, policy_chunk_objective
from deepgen_rl.trainer.reference_policy import ReferencePolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="Prompts B of the chunk.")
    parser.add_argument("--group", type=int, default=4, help="Group size G (the chunk holds B x G samples).")
    parser.add_argument("--steps", type=int, default=10, help="Denoising steps T of the rollout.")
    parser.add_argument("--repeats", type=int, default=31, help="Timed runs of each variant (interleaved).")
    parser.add_argument("--image_size", type=int, default=TINY_IMAGE_SIZE, help="Image side in pixels.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_tiny_deepgen(seed=0)
    model.set_trainable("dit")
    reference = ReferencePolicy.frozen_copy(model, ["transformer"])
    prompts = [f"prompt {i}: a red apple on a wooden table" for i in range(args.prompts)]
    trajectory = rollout(model, prompts, group_size=args.group, sampler="cps_sde", eta=1.0,
                         logprob_variant="reference", num_inference_steps=args.steps, height=args.image_size,
                         width=args.image_size, cfg_scale=0.0, init_same_noise=True,
                         generator=torch.Generator().manual_seed(0))
    num = trajectory.num_samples
    advantages = torch.randn(num, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(num, dtype=torch.bool)
    settings = ObjectiveSettings(clip_range=1e-4, advantage_clip=5.0, beta=5e-7, kl_type="v-based")
    step = args.steps // 2
    rows = slice(None)
    x, _ = trajectory.transition(step, rows)
    sigmas = trajectory.sigmas[step].expand(num)
    cond = trajectory.conditioning
    model.train()

    def ours() -> None:
        out = policy_chunk_objective(model, trajectory, step, rows, advantages=advantages, valid=valid,
                                     settings=settings, reference=reference, reference_conditioning=None)
        out.loss.backward()

    def bare() -> None:
        v = model.transformer(hidden_states=x, timestep=sigmas * 1000.0, encoder_hidden_states=cond.prompt_embeds,
                              pooled_projections=cond.pooled, return_dict=False)[0]
        with torch.no_grad():
            reference._model.transformer(hidden_states=x, timestep=sigmas * 1000.0,
                                         encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled,
                                         return_dict=False)
        v.mean().backward()

    variants = [("ours", ours), ("bare", bare)]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _, fn in variants + variants:  # warm-up
        fn()
    for repeat in range(args.repeats):
        for name, fn in variants if repeat % 2 == 0 else variants[::-1]:
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    ratio = statistics.median(o / b for o, b in zip(times["ours"], times["bare"]))
    print(f"device: cpu, threads: {torch.get_num_threads()}, chunk {num} samples, step {step} of {args.steps}, "
          f"latent {tuple(model.latent_shape(args.image_size, args.image_size))}, repeats {args.repeats} "
          "(interleaved; process CPU time; median of per-repeat ratios)")
    print(f"median times: ours (recompute + log-prob + clipped loss + ref KL + backward) {med['ours'] * 1e3:.2f} ms | "
          f"bare (same DiT forward + ref forward + backward) {med['bare'] * 1e3:.2f} ms")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()

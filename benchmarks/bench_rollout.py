"""Rollout loop overhead: our SDE rollout loop vs a bare diffusers-style Euler loop over the same DiT.

Both loops run the tiny DeepGen DiT (``model.transformer``) on the same prompt embeddings, batch and number of
steps. Ours is :func:`deepgen_rl.sampling.rollout.denoise_loop` on the default sampler (CPS-SDE, reference
log-prob) recording every latent and log-prob, through ``model.predict_velocity``; the bare loop calls the
transformer and does x <- x + dt v. A third loop (Euler through ``model.predict_velocity``) splits the
overhead into the model wrapper's share and the sampler loop's share.

Repeats are interleaved (ABC, CBA, ...), each timed in process CPU time on one thread (other jobs on a
shared machine then barely move the figures), and the ratio is the median of per-repeat ratios.

    python benchmarks/bench_rollout.py            # prints `ratio: <ours/bare>` (target <= 1.05)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, build_tiny_deepgen
from deepgen_rl.sampling.rollout import denoise_loop, encode_conditioning
from deepgen_rl.sampling.trajectory import SamplerSettings


def bare_euler(transformer, x: torch.Tensor, prompt_embeds, pooled, sigmas: torch.Tensor) -> torch.Tensor:
    """The yardstick: what a diffusers pipeline's denoising loop does with FlowMatchEulerDiscreteScheduler."""
    timesteps = sigmas[:-1] * 1000.0
    n = x.shape[0]
    for i in range(len(sigmas) - 1):
        v = transformer(hidden_states=x, timestep=timesteps[i].expand(n), encoder_hidden_states=prompt_embeds,
                        pooled_projections=pooled, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def wrapped_euler(model, x: torch.Tensor, prompt_embeds, pooled, sigmas: torch.Tensor) -> torch.Tensor:
    """The same Euler loop through ``model.predict_velocity``: separates the model wrapper's cost from ours."""
    sigma_list = sigmas.tolist()
    n = x.shape[0]
    for i in range(len(sigma_list) - 1):
        v = model.predict_velocity(x, sigmas[i].expand(n), prompt_embeds, pooled)
        x = x + (sigma_list[i + 1] - sigma_list[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="Samples per loop (N = B * G).")
    parser.add_argument("--steps", type=int, default=10, help="Denoising steps T.")
    parser.add_argument("--repeats", type=int, default=31, help="Timed runs of each loop (interleaved).")
    parser.add_argument("--image_size", type=int, default=TINY_IMAGE_SIZE, help="Image side in pixels.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps shared CI cores from stalling OpenMP barriers).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_tiny_deepgen(seed=0)
    prompts = [f"prompt {i}: a red apple on a wooden table" for i in range(args.batch // 4)]
    settings = SamplerSettings(sampler="cps_sde", eta=1.0, logprob_variant="reference", cfg_scale=0.0)
    with torch.no_grad():
        cond = encode_conditioning(model, prompts, 4, 0.0)
        sigmas = model.sigma_schedule(args.steps, args.image_size, args.image_size)
        shape = model.latent_shape(args.image_size, args.image_size)
    num = cond.prompt_embeds.shape[0]
    x0 = torch.randn((num, *shape), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)

    def ours() -> None:
        latents = torch.empty((args.steps + 1, num, *shape))  # step-major, as rollout() allocates it
        log_probs = torch.empty((args.steps, num))
        denoise_loop(model, x0, cond, sigmas, settings, generator, latents, log_probs)

    def bare() -> None:
        bare_euler(model.transformer, x0, cond.prompt_embeds, cond.pooled, sigmas)

    def wrapped() -> None:
        wrapped_euler(model, x0, cond.prompt_embeds, cond.pooled, sigmas)

    loops = [("ours", ours), ("bare", bare), ("wrapped", wrapped)]
    times: dict[str, list[float]] = {name: [] for name, _ in loops}
    with torch.no_grad():
        for _, fn in loops + loops:  # warm-up
            fn()
        for repeat in range(args.repeats):
            # ABC then CBA: a slow drift of the machine's load hits every loop alike.
            for name, fn in loops if repeat % 2 == 0 else loops[::-1]:
                start = time.process_time()  # CPU time of this (single-threaded) process: robust to the
                fn()                             # load other jobs put on a shared machine
                times[name].append(time.process_time() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    # Per-repeat ratios of runs made back to back (same load), then their median: robust on shared machines.
    ratio = statistics.median(o / b for o, b in zip(times["ours"], times["bare"]))
    wrapper = statistics.median(w / b for w, b in zip(times["wrapped"], times["bare"]))
    loop_only = statistics.median(o / w for o, w in zip(times["ours"], times["wrapped"]))
    print(f"device: cpu, threads: {torch.get_num_threads()}, batch {num}, steps {args.steps}, "
          f"latent {tuple(shape)}, repeats {args.repeats} "
          "(interleaved; process CPU time; medians of per-repeat ratios)")
    print(f"median times: ours (cps_sde + recording) {med['ours'] * 1e3:.2f} ms | bare Euler on model.transformer "
          f"{med['bare'] * 1e3:.2f} ms | Euler via model.predict_velocity {med['wrapped'] * 1e3:.2f} ms")
    print(f"model wrapper: predict_velocity Euler / bare = {wrapper:.3f}; "
          f"sampler loop: ours / predict_velocity Euler = {loop_only:.3f}")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()

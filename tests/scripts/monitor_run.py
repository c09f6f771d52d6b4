"""A training run through the real entry point (``grpo_deepgen.main``, its exit status included) whose periodic
evaluation is a held-out synthetic_match score instead of UniGenBench (which needs a judge server):

    python tests/scripts/monitor_run.py --heldout_prompts FILE [--heldout_samples K] <grpo_deepgen flags>

The hook samples each held-out prompt K times (default 4) with ONE fixed generator (the same noise at every
evaluation, so the score moves only with the weights; noise the rollouts never draw) and logs their mean
synthetic_match as ``eval/synthetic/overall`` (its standard error over the samples as
``eval/synthetic/overall_se``), the metric the monitor's default --monitor_eval_metric ("overall") reads.
Without --heldout_prompts it is grpo_deepgen's main, unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELDOUT_SEED = 4321


def _pop_flag(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    if flag not in argv:
        return argv, None
    index = argv.index(flag)
    return argv[:index] + argv[index + 2:], argv[index + 1]


def heldout_hook(args, prompts: list[str], samples: int = 4):
    """hook(model, step) -> {"eval/synthetic/overall": mean synthetic_match of the fixed-noise samples,
    "eval/synthetic/overall_se": its standard error}."""
    import numpy as np
    import torch

    from deepgen_rl.rewards.reward_step import images_to_pil
    from deepgen_rl.rewards.synthetic import match_score, parse_prompt
    from deepgen_rl.sampling import decode_images, rollout

    def hook(model, step):
        with torch.no_grad():
            batch = rollout(model, prompts, group_size=samples, sampler="ode", eta=0.0,
                            logprob_variant=args.logprob_variant, num_inference_steps=args.num_inference_steps,
                            height=args.image_height, width=args.image_width, cfg_scale=args.rollout_cfg_scale,
                            init_same_noise=False, generator=torch.Generator().manual_seed(HELDOUT_SEED),
                            micro_batch_size=len(prompts) * samples)
            images = images_to_pil(decode_images(model, batch.latents[:, -1], args.vae_decode_micro_batch_size))
        owners = [prompts[i // samples] for i in range(len(images))]
        scores = [match_score(image, parse_prompt(owner)) for image, owner in zip(images, owners)]
        # the score's standard error over its samples: the divergence alarm's measure of evaluation noise
        return {"eval/synthetic/overall": float(np.mean(scores)),
                "eval/synthetic/overall_se": float(np.std(scores, ddof=1) / np.sqrt(len(scores)))}

    return hook


def main(argv: list[str]) -> int:
    argv, heldout = _pop_flag(argv, "--heldout_prompts")
    argv, samples = _pop_flag(argv, "--heldout_samples")
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.trainer import eval_hook

    if heldout is not None:
        prompts = Path(heldout).read_text().splitlines()
        eval_hook.build_eval_hook = lambda args, *rest, **kw: heldout_hook(args, prompts, int(samples or 4))
    return grpo_deepgen.main(argv)


if __name__ == "__main__":
    from deepgen_rl.core.distributed import destroy

    try:
        code = main(sys.argv[1:])
    finally:
        destroy()
    sys.exit(code)

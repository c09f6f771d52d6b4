"""Samples of a tiny model on the synthetic task, scored by ``synthetic_match``, as numbers and a captioned grid.

    python -m deepgen_rl.eval.synthetic_report --output before.png [--checkpoint trained.pth]

loads the tiny model (with its connector flags) from the usual paths (SD3_5_MODEL_NAME_OR_PATH /
QWEN2_5_VL_MODEL_NAME_OR_PATH / CHECKPOINT, then ``--checkpoint`` on top, e.g. the quick start's converted
``.pth``), samples ``--group_size`` images per prompt of ``--prompts`` with a FIXED generator (so two models are
compared on the same noise), and writes a grid: one row per prompt, the prompt and the row's mean reward written
under it. It prints the mean reward and the prompt-specific part of it (``prompt_specific_reward``: the reward
minus the same images' reward against the next prompt's objects).

Legend: B prompts, G samples per prompt, N = B * G images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deepgen_rl.rewards.synthetic import match_score, parse_prompt

CAPTION_HEIGHT = 14  # pixels of text under each row
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "assets" / "rl_datasets" / "synthetic" / "prompts.txt"


@dataclass(frozen=True)
class SyntheticSamples:
    """images: [N, 3, H, W] in [0, 1]; prompts: B; scores: [B, G] synthetic_match of each sample."""

    images: torch.Tensor
    prompts: list[str]
    scores: np.ndarray

    @property
    def mean_reward(self) -> float:
        return float(self.scores.mean())

    def mismatched_reward(self) -> float:
        """Mean reward of each image scored against the NEXT prompt's objects (a prompt it was not made for)."""
        from deepgen_rl.rewards.reward_step import images_to_pil

        group = self.scores.shape[1]
        images = images_to_pil(self.images)
        shifted = self.prompts[1:] + self.prompts[:1]
        return float(np.mean([match_score(image, parse_prompt(shifted[i // group])) for i, image in enumerate(images)]))

    def prompt_specific_reward(self) -> float:
        """Matched minus mismatched reward: what the images owe to THEIR prompt, not to generic statistics
        (a whiter or more saturated image raises both terms alike)."""
        return self.mean_reward - self.mismatched_reward()


def sample_synthetic(model, prompts: Sequence[str], *, group_size: int, num_inference_steps: int, image_size: int,
                     seed: int, sampler: str = "cps_sde", eta: float = 1.0) -> SyntheticSamples:
    """G samples per prompt and their rewards: ``sampler`` at ``eta`` with no CFG, independent initial noise per
    sample, all drawn from one generator seeded ``seed`` (the same noise for two models compared)."""
    from deepgen_rl.rewards.reward_step import images_to_pil
    from deepgen_rl.sampling import decode_images, rollout

    unknown = [p for p in prompts if parse_prompt(p) is None]
    if unknown:
        raise ValueError(f"not synthetic_match prompts: {unknown[:3]}")
    trajectory = rollout(model, list(prompts), group_size=group_size, sampler=sampler, eta=eta,
                    logprob_variant="reference", num_inference_steps=num_inference_steps, height=image_size,
                    width=image_size, cfg_scale=0.0, init_same_noise=False,
                    generator=torch.Generator().manual_seed(seed))
    images = decode_images(model, trajectory.latents[:, -1], None).cpu()
    pil = images_to_pil(images)
    scores = np.array([match_score(image, parse_prompt(prompts[i // group_size])) for i, image in enumerate(pil)])
    return SyntheticSamples(images=images, prompts=list(prompts), scores=scores.reshape(len(prompts), group_size))


def captioned_grid(samples: SyntheticSamples, title: str = "") -> Image.Image:
    """One row per prompt (its G samples), the prompt and the row's mean reward written under the row."""
    from deepgen_rl.core.images import image_grid

    group = samples.scores.shape[1]
    _, _, height, width = samples.images.shape
    font = ImageFont.load_default()
    top = CAPTION_HEIGHT if title else 0
    canvas = Image.new("RGB", (max(group * width, 360), top + len(samples.prompts) * (height + CAPTION_HEIGHT)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill="black", font=font)
    for row, prompt in enumerate(samples.prompts):
        y = top + row * (height + CAPTION_HEIGHT)
        canvas.paste(image_grid(samples.images[row * group:(row + 1) * group], group), (0, y))
        draw.text((2, y + height + 1), f"{prompt}  (reward {samples.scores[row].mean():.2f})", fill="black",
                  font=font)
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model import load_checkpoint_into, load_deepgen_model
    from deepgen_rl.model.tiny import TINY_IMAGE_SIZE, TINY_MODEL_FLAGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="PNG of the captioned sample grid.")
    parser.add_argument("--checkpoint", default="", help=".pth loaded on top of CHECKPOINT (e.g. the RL result).")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="Prompt file (one prompt per line).")
    parser.add_argument("--group_size", type=int, default=8, help="Samples per prompt (columns).")
    parser.add_argument("--num_inference_steps", type=int, default=4, help="Sampler steps.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the fixed sampling noise.")
    parser.add_argument("--title", default="", help="Text written above the grid.")
    args = parser.parse_args(argv)
    prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    model = load_deepgen_model(ModelArguments(model_dtype="float32", **TINY_MODEL_FLAGS))
    if args.checkpoint:
        load_checkpoint_into(model, args.checkpoint, trainable_modules="dit")
    samples = sample_synthetic(model.eval(), prompts, group_size=args.group_size,
                               num_inference_steps=args.num_inference_steps, image_size=TINY_IMAGE_SIZE,
                               seed=args.seed)
    captioned_grid(samples, args.title).save(args.output)
    summary = {"reward": round(samples.mean_reward, 4),
               "prompt_specific_reward": round(samples.prompt_specific_reward(), 4), "grid": args.output}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

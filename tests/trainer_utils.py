"""Helpers of the trainer tests: tiny-run flags, a torchrun launcher, and (run as a script) a training run that
dumps a digest of every parameter, or a fixed-noise reward, before and after training.

    torchrun --nproc_per_node 2 tests/trainer_utils.py --param_dump out.json <grpo_deepgen flags>
    python tests/trainer_utils.py --reward_dump out.json <grpo_deepgen flags>        # one process
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_YAML = REPO_ROOT / "assets" / "rl_datasets" / "quickstart" / "quickstart.yaml"
ZERO2 = REPO_ROOT / "scripts" / "deepspeed" / "zero2.json"
ZERO3 = REPO_ROOT / "scripts" / "deepspeed" / "zero3.json"

# The tiny run: 64x64 images, 6 steps (4 trained), groups of 4, jpeg_compressibility only (no server).
TINY_RUN = {
    "image_height": 64, "image_width": 64, "num_inference_steps": 6, "rollout_n": 4, "global_batch_size": 8,
    "rollout_micro_batch_size": 8, "atrain_micro_batch_size": 8, "eval_freq": 0, "sample_image_freq": 0,
    "report_to": "none", "save_strategy": "no", "gradient_checkpointing": False, "seed": 0,
    "dataset_config": str(QUICKSTART_YAML),
    "sftaux_global_batch_size": 4,  # SFT-aux is on by default; its default 32 items per step would slow every run
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_run_flags(tiny_paths, output_dir: Path, **overrides) -> list[str]:
    """grpo_deepgen flags of a tiny run (model flags + TINY_RUN + overrides; None drops a flag)."""
    values = {**TINY_RUN, "output_dir": str(output_dir), "sd3_model_name_or_path": str(tiny_paths.sd3_dir),
              "qwen2_5_vl_model_name_or_path": str(tiny_paths.qwen_dir), "checkpoint": str(tiny_paths.checkpoint),
              **overrides}
    flags = list(tiny_paths.model_flags())
    for name, value in values.items():
        if value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def run_env(tiny_paths, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(tiny_paths.env())
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "SWANLAB_MODE": "offline",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def torchrun(nproc: int, script_args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc`` on 127.0.0.1 with a free port; output captured (bounded by timeout)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script_args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


# ----- run as a script under torchrun ------------------------------------------------------------------------


def param_digests(model) -> dict[str, dict]:
    """{name: {"sha256", "trainable"}} of every parameter, gathered whole under ZeRO-3 (collective)."""
    import deepspeed
    import torch

    params = dict(model.named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
        out = {}
        for name, param in params.items():
            data = param.detach().to("cpu", torch.float32).contiguous()
            out[name] = {"sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "trainable": param.requires_grad}
    return out


def _pop_flag(argv: list[str], flag: str) -> tuple[list[str], Optional[str]]:
    if flag not in argv:
        return argv, None
    index = argv.index(flag)
    return argv[:index] + argv[index + 2:], argv[index + 1]


def fixed_noise_reward(trainer, seed: int = 1234, samples_per_prompt: int = 16) -> dict[str, float]:
    """The first dataset's prompts x ``samples_per_prompt`` samples drawn with a FIXED generator (common random
    numbers, so the difference between two calls measures the weights' change, not sampling noise), scored:
    "scores" holds each sample's JPEG compressibility, or for synthetic prompts (rewards/synthetic.py) its
    synthetic_match, and "reward" their mean; "mismatched" (synthetic only) is the mean score of the same images
    against the next prompt's objects: the part of the reward that is not about the image's own prompt."""
    import numpy as np
    import torch

    from deepgen_rl.rewards.jpeg import jpeg_compressibility
    from deepgen_rl.rewards.reward_step import images_to_pil
    from deepgen_rl.rewards.synthetic import match_score, parse_prompt
    from deepgen_rl.sampling import decode_images, rollout

    args = trainer.args
    prompts = list(trainer.prompt_sampler.datasets[0].prompts)
    batch = rollout(trainer.model, prompts, group_size=samples_per_prompt, sampler=args.atrain_sde_sampler,
                    eta=args.sde_eta, logprob_variant=args.logprob_variant,
                    num_inference_steps=args.num_inference_steps, height=args.image_height, width=args.image_width,
                    cfg_scale=args.rollout_cfg_scale, init_same_noise=args.init_same_noise,
                    generator=torch.Generator().manual_seed(seed), micro_batch_size=args.rollout_micro_batch_size)
    images = images_to_pil(decode_images(trainer.model, batch.latents[:, -1], args.vae_decode_micro_batch_size))
    if parse_prompt(prompts[0]) is None:
        scores = [jpeg_compressibility(image) for image in images]
        return {"reward": float(np.mean(scores)), "scores": scores}
    owners = [prompts[i // samples_per_prompt] for i in range(len(images))]
    others = [prompts[(prompts.index(owner) + 1) % len(prompts)] for owner in owners]
    scores = [match_score(image, parse_prompt(prompt)) for image, prompt in zip(images, owners)]
    mismatched = [match_score(image, parse_prompt(prompt)) for image, prompt in zip(images, others)]
    return {"reward": float(np.mean(scores)), "mismatched": float(np.mean(mismatched)), "scores": scores}


def build_trainer_from_argv(argv: list[str]):
    """The trainer grpo_deepgen's entry point builds from these flags (this process's rank from the environment):
    (parsed GRPOConfig, trainer)."""
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args

    grpo_deepgen.ensure_single_process_env(os.environ)
    args, *groups = parse_args(argv)
    device = grpo_deepgen._init_distributed()
    grpo_deepgen._setup_logging(int(os.environ.get("RANK", "0")))
    return args, grpo_deepgen.build_trainer(args, *groups, device)


def main(argv: list[str]) -> int:
    """grpo_deepgen's run, plus (rank 0) parameter digests before / after training to --param_dump and the
    fixed-noise reward before / after training with the per-step reward curve to --reward_dump."""
    argv, dump = _pop_flag(argv, "--param_dump")
    argv, reward_dump = _pop_flag(argv, "--reward_dump")
    _, trainer = build_trainer_from_argv(argv)
    try:
        before = param_digests(trainer.model) if dump else None
        reward_before = fixed_noise_reward(trainer) if reward_dump else None
        trainer.train()
        after = param_digests(trainer.model) if dump else None
        reward_after = fixed_noise_reward(trainer) if reward_dump else None
    finally:
        trainer.close()
    if dump and trainer.rank == 0:
        Path(dump).write_text(json.dumps({"before": before, "after": after,
                                          "steps": trainer.state.global_step}, indent=1))
    if reward_dump and trainer.rank == 0:
        curve = [record["reward/mean"] for record in trainer.state.log_history if "reward/mean" in record]
        Path(reward_dump).write_text(json.dumps({"before": reward_before, "after": reward_after, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

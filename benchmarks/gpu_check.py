"""GPU check: one GRPO step of the REAL-size DeepGen model (random weights, bf16) on one CUDA device.

No download: every part is built from config objects written below (Qwen2.5-VL-3B-Instruct, SD3.5-Medium DiT
and VAE, the DeepGen connector) with random weights, created directly on the GPU in bf16. The step is the
trainer's own (DeepGenGRPOTrainer under DeepSpeed ZeRO-2, world size 1) at the guide's settings: 512x512,
cps_sde, eta 1.0, 50 steps, 4 prompts x rollout_n 8 = 32 images (rollout and train micro-batch 32), 30 trained
steps, beta 5e-7 with a reference DiT copy, gradient checkpointing. The reward is local (JPEG compressibility:
no server); SFT-aux is off (it needs an image dataset). It prints:

    rollout images/s, decode seconds, train-phase seconds, peak GPU memory vs the estimator's figure,
    the first chunk's ratio deviation (must be ~0: rollout and training share the sampler arithmetic)

    python benchmarks/gpu_check.py            # needs a CUDA device; exits 0 with a message when there is none
    python benchmarks/gpu_check.py --smoke    # tiny sizes on the CPU: the same code path, in seconds

Budget: the step must finish in under 8 minutes on one H100-class GPU (the total is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_YAML = REPO_ROOT / "assets" / "rl_datasets" / "quickstart" / "quickstart.yaml"
ZERO2 = REPO_ROOT / "scripts" / "deepspeed" / "zero2.json"
TIME_BUDGET_S = 480.0

# ----- real sizes (published configs of Qwen2.5-VL-3B-Instruct and SD3.5-Medium; DeepGen's connector) -----------

QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
QWEN_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [16, 24, 24]}, **QWEN_IDS)
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653, tie_word_embeddings=True)
SD35M_DIT = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                 dual_attention_layers=tuple(range(13)))
SD35M_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), sample_size=1024, shift_factor=0.0609,
                 scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
REAL_CONNECTOR = dict(connector_hidden_size=2048, connector_intermediate_size=11946, connector_num_layers=6,
                      connector_num_heads=32, num_queries=128, num_fusion_layers=6)


@dataclass(frozen=True)
class CheckSettings:
    """What one check runs: model size, step shape and where."""

    smoke: bool
    image_size: int
    steps: int
    prompts: int
    group: int

    @property
    def images(self) -> int:
        return self.prompts * self.group


REAL = CheckSettings(smoke=False, image_size=512, steps=50, prompts=4, group=8)
SMOKE = CheckSettings(smoke=True, image_size=64, steps=4, prompts=2, group=4)


def build_real_parts(tokenizer):
    """Qwen2.5-VL-3B, the SD3.5-Medium DiT and VAE and the scheduler, random, in torch's current dtype/device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION, **QWEN_TOKENS)
    return (Qwen2_5_VLForConditionalGeneration(config), SD3Transformer2DModel(**SD35M_DIT),
            AutoencoderKL(**SD35M_VAE), FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))


def build_smoke_parts(tokenizer):
    from deepgen_rl.model.tiny import build_tiny_lmm, build_tiny_sd3

    return (build_tiny_lmm(tokenizer), *build_tiny_sd3())


def build_random_deepgen(settings: CheckSettings, dtype: torch.dtype, device: torch.device):
    """The joint model with random weights, every tensor created in ``dtype`` on ``device`` (no host copy)."""
    from deepgen_rl.model.connector import ConnectorConfig
    from deepgen_rl.model.deepgen import DeepGenModel
    from deepgen_rl.model.loading import created_in
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS, build_tiny_tokenizer

    flags = TINY_MODEL_FLAGS if settings.smoke else REAL_CONNECTOR
    build_parts: Callable = build_smoke_parts if settings.smoke else build_real_parts
    tokenizer = build_tiny_tokenizer()  # ids < 640 are valid in any vocabulary; no download
    with created_in(dtype, device):
        lmm, transformer, vae, scheduler = build_parts(tokenizer)
        model = DeepGenModel(
            lmm=lmm, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler,
            connector_config=ConnectorConfig(
                hidden_size=flags["connector_hidden_size"], intermediate_size=flags["connector_intermediate_size"],
                num_hidden_layers=flags["connector_num_layers"], num_attention_heads=flags["connector_num_heads"]),
            num_queries=flags["num_queries"], num_fusion_layers=flags["num_fusion_layers"],
        )
    return model.requires_grad_(False).eval()


def training_flags(settings: CheckSettings, output_dir: str) -> list[str]:
    """The guide's defaults, at this check's image size, steps and batch (one rank holds the whole batch)."""
    flags = {"output_dir": output_dir, "deepspeed": str(ZERO2), "dataset_config": str(QUICKSTART_YAML),
             "image_height": settings.image_size, "image_width": settings.image_size,
             "num_inference_steps": settings.steps, "rollout_n": settings.group,
             "global_batch_size": settings.images, "rollout_micro_batch_size": settings.images,
             "atrain_micro_batch_size": settings.images, "sftaux_coef": 0.0, "eval_freq": 0,
             "sample_image_freq": 0, "max_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
             "stream_rewards": False}  # serial phases: rollout images/s and decode seconds measured apart
    if settings.smoke:
        flags["gradient_checkpointing"] = False
    else:
        flags["bf16"] = True
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


def estimator_figure(model_args, args) -> str:
    from deepgen_rl.estimate_memory import estimate_memory

    try:
        return f"{estimate_memory(model_args, args, num_gpus=1, zero_stage=2).total_bytes / 2**30:.2f} GiB"
    except Exception as err:  # the check's own figures still count
        return f"estimator failed: {err}"


def init_single_process(cuda: bool) -> tuple[torch.device, bool]:
    """A one-rank process group (DeepSpeed needs one): nccl on cuda:0, gloo on the CPU; reuses a live one.
    Returns the device and whether the group was created here."""
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
    return torch.device("cuda:0" if cuda else "cpu"), created


def run_check(settings: CheckSettings) -> dict[str, float]:
    """Build, run one GRPO step, print the figures; returns them."""
    started = time.perf_counter()
    device, created_group = init_single_process(cuda=not settings.smoke)
    try:
        figures, estimate = _one_step(settings, device, started)
    finally:
        if created_group:  # through DeepSpeed, which then forgets its cached groups (a later run makes new ones)
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
    print_figures(settings, figures, estimate, device)
    return figures


def _one_step(settings: CheckSettings, device: torch.device, started: float) -> tuple[dict[str, float], str]:
    from deepgen_rl.config import parse_args
    from deepgen_rl.data import PromptSampler, load_dataset_config
    from deepgen_rl.rewards.jpeg import JpegCompressibilityReward
    from deepgen_rl.rewards.reward_step import RewardStep
    from deepgen_rl.trainer import DeepGenGRPOTrainer

    dtype = torch.float32 if settings.smoke else torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as output_dir:
        args, model_args, data_args, *_ = parse_args(training_flags(settings, output_dir))
        if settings.smoke:
            from deepgen_rl.model.tiny import TINY_MODEL_FLAGS

            for name, value in TINY_MODEL_FLAGS.items():
                setattr(model_args, name, value)
        model = build_random_deepgen(settings, dtype, device)
        built = time.perf_counter()
        prompt_sampler = PromptSampler(load_dataset_config(data_args.dataset_config), seed=args.seed)
        reward_step = RewardStep({"jpeg_compressibility": JpegCompressibilityReward()})
        trainer = DeepGenGRPOTrainer(model, args, prompt_sampler=prompt_sampler, reward_step=reward_step,
                                     num_prompts=sum(prompt_sampler.sizes), trainable_modules="dit")
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_started = time.perf_counter()
            metrics, batch, _ = trainer.training_step()
            step_seconds = time.perf_counter() - step_started
            metrics.update(trainer.timer.pop())
        finally:
            trainer.close()
        figures = {
            "images": float(batch.trajectory.num_samples),
            "rollout_images_per_s": batch.trajectory.num_samples / metrics["time/rollout"],
            "decode_s": metrics["time/decode"], "train_s": metrics["time/train"], "step_s": step_seconds,
            "build_s": built - started, "first_chunk_ratio_max_dev": metrics["policy/first_chunk_ratio_max_dev"],
            "total_s": time.perf_counter() - started,
        }
        if device.type == "cuda":
            figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        estimate = estimator_figure(model_args, args)
    return figures, estimate


def print_figures(settings: CheckSettings, figures: dict[str, float], estimate: str, device: torch.device) -> None:
    size = "tiny (smoke)" if settings.smoke else "real"
    print(f"gpu_check: {size} DeepGen, {int(figures['images'])} images at {settings.image_size}^2, "
          f"{settings.steps} steps, on {device}")
    print(f"  rollout images/s           {figures['rollout_images_per_s']:.2f}")
    print(f"  decode seconds             {figures['decode_s']:.2f}")
    print(f"  train-phase seconds        {figures['train_s']:.2f}")
    peak = f"{figures['peak_gib']:.2f} GiB" if "peak_gib" in figures else "n/a (no CUDA device)"
    print(f"  peak GPU memory            {peak} (estimator, 1 GPU ZeRO-2: {estimate})")
    print(f"  first-chunk ratio max dev  {figures['first_chunk_ratio_max_dev']:.3g}")
    print(f"  build / step / total s     {figures['build_s']:.1f} / {figures['step_s']:.1f} / {figures['total_s']:.1f}"
          f"{'' if figures['total_s'] <= TIME_BUDGET_S else f'  OVER the {TIME_BUDGET_S:.0f} s budget'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU (the same code path, seconds).")
    cli = parser.parse_args(argv)
    if cli.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return 0 if run_check(SMOKE) else 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to check (run it on a GPU machine, or --smoke on the CPU).")
        return 0
    try:
        run_check(REAL)
    except torch.cuda.OutOfMemoryError as err:
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"gpu_check: out of GPU memory (peak {peak:.1f} GiB): {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

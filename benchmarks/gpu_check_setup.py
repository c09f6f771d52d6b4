"""What benchmarks/gpu_check.py runs against: the model folders, the data files, the stand-in servers, the flags
and the compute model. Everything is written under one temporary folder; nothing is downloaded.

* Model: the published configs (model/published_configs.py) with random bf16 weights, written in the published
  on-disk layout (a diffusers SD3.5 folder whose transformer is UniPic2's ``SD3Transformer2DKontextModel``, a
  transformers Qwen2.5-VL folder, a DeepGen CHECKPOINT ``.pth`` in the reference key names with an LLM LoRA), so
  the trainer loads it back through ``load_deepgen_model`` as it loads the real weights. ``--smoke``: the tiny
  parts of model/tiny.py in the same layout.
* Data: 8 prompts with a quoted text scored by the ``ocr`` reward (served by the stand-in server below), the shipped
  SFT-aux config (its built-in images), a 4-prompt UniGenBench CSV for the periodic evaluation, and an edit
  dataset (Kontext: one source image per prompt).
* Servers (real processes on 127.0.0.1, stopped on exit): tests/servers/fake_reward_server.py speaks our OCR
  contract (score = mean brightness / 255); tests/servers/fake_judge.py is the stand-in UniGenBench judge.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The ocr reward scores the double-quoted text of a prompt (the trainer's preflight refuses prompts without one).
TRAIN_PROMPTS = ('a shop sign that says "OPEN"', 'a red mug printed with "COFFEE"', 'a poster reading "SALE 50%"',
                 'a street sign with the word "EXIT"', 'a birthday cake with "HAPPY" written on it',
                 'a book cover titled "DEEPGEN"', 'a neon light spelling "BAR"', 'a chalkboard reading "MENU"')
ZERO2 = REPO_ROOT / "scripts" / "deepspeed" / "zero2.json"
JUDGE_MODEL = "UniGenBench-EvalModel-qwen3vl-32b-v1"
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class CheckSettings:
    """What one check runs. The GRPO steps use the guide's settings (real) or tiny ones (smoke); the edit step is
    smaller (its own numbers); ``ema_update_every``: one EMA update per GRPO step (the reference schedule takes
    2 T_train + 1 optimizer steps, each EMA update on the CPU copies every trained weight)."""

    smoke: bool
    image_size: int
    steps: int
    prompts: int
    group: int
    lora_rank: int
    edit_prompts: int
    edit_group: int
    edit_steps: int
    eval_steps: int
    ema_update_every: int

    @property
    def images(self) -> int:
        return self.prompts * self.group


# 512^2, 50 steps (30 trained: --timestep_fraction 0.6), 4 prompts x 8 = 32 images; 2 x 30 + 1 = 61 optimizer steps.
REAL = CheckSettings(smoke=False, image_size=512, steps=50, prompts=4, group=8, lora_rank=64, edit_prompts=1,
                     edit_group=8, edit_steps=20, eval_steps=50, ema_update_every=61)
SMOKE = CheckSettings(smoke=True, image_size=64, steps=4, prompts=2, group=4, lora_rank=4, edit_prompts=1,
                      edit_group=4, edit_steps=4, eval_steps=2, ema_update_every=5)


# ----- model folders ----------------------------------------------------------------------------------------------

def llm_lora_state(lmm: torch.nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """peft-named LoRA factors (``lmm.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]) for every
    attention and MLP projection of the language model, small random values (the loader merges them)."""
    state = {}
    for name, module in lmm.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLM_LORA_TARGETS \
                and ".visual." not in f".{name}.":
            out_features, in_features = module.weight.shape
            state[f"lmm.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            state[f"lmm.{name}.lora_B.weight"] = 1e-3 * torch.randn(out_features, rank, generator=generator)
    return state


def write_random_model(root: Path, settings: CheckSettings, device: torch.device):
    """Random weights in the published layout under ``root`` (CHECKPOINT: the reference's keys + an LLM LoRA);
    returns their TinyModelPaths and the model flags (connector sizes) to load them with."""
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS, build_tiny_deepgen, save_deepgen_parts

    if settings.smoke:
        model, flags = build_tiny_deepgen(seed=0), dict(TINY_MODEL_FLAGS)
    else:
        model, flags = _random_real_model(root, device), {}
    lora = llm_lora_state(model.lmm, settings.lora_rank, torch.Generator().manual_seed(0))
    paths = save_deepgen_parts(model, root, extra_checkpoint=lora)
    del model
    return paths, flags


def _random_real_model(root: Path, device: torch.device):
    """The real-size joint model from the published configs, every tensor created in bf16 on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.kontext import SD3Transformer2DKontextModel
    from deepgen_rl.model.loading import assemble_deepgen_model, created_in
    from deepgen_rl.model.published_configs import write_published_configs

    sd3, qwen = write_published_configs(root / "configs")
    with created_in(torch.bfloat16, device):
        model = assemble_deepgen_model(
            ModelArguments(model_dtype="bfloat16"),
            lmm=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(qwen)),
            tokenizer=AutoTokenizer.from_pretrained(qwen),
            transformer=SD3Transformer2DKontextModel.from_config(
                SD3Transformer2DKontextModel.load_config(sd3 / "transformer")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(sd3 / "vae")),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler"))
    return model.requires_grad_(False)


# ----- data files ---------------------------------------------------------------------------------------------------

def write_data(root: Path, settings: CheckSettings) -> dict[str, Path]:
    """The training YAML (TRAIN_PROMPTS, ``ocr`` reward), the eval YAML + CSV (4 prompts) and the edit YAML
    (one source image per prompt); returns their paths."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n", encoding="utf-8")
    (root / "train.yaml").write_text(
        "sampling_mode: sample_proportional\ndatasets:\n"
        "  - {name: check, path: prompts.txt, sample_weight: 1.0, rewards: [{ocr: 1.0}]}\n", encoding="utf-8")
    prompts = ["a red apple on a wooden table", "a city street at night", "two pandas in a forest",
               "a robot reading a book"]
    with (root / "bench.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "prompt", "sub_dims"])
        for index, prompt in enumerate(prompts):
            writer.writerow([index, prompt, json.dumps({"Primary Categories": "Art", "Testpoints": ["Style", "Layout"],
                                                        "Testpoint Description": ["style", "layout"]})])
    (root / "eval.yaml").write_text(
        f"datasets:\n  - {{name: bench, path: bench.csv, cfg_scale: 4.0, num_inference_steps: {settings.eval_steps}, "
        "duplicates: 1, scoring: unigenbench/en}\n", encoding="utf-8")
    (root / "images").mkdir(exist_ok=True)
    size = settings.image_size
    Image.new("RGB", (size, size), (200, 40, 40)).save(root / "images" / "source.png")
    records = [{"instruction": text, "source_images": ["images/source.png"]}
               for text in ('add a sign reading "STOP"', 'write "HELLO" on it', 'add the word "OPEN"')]
    (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    (root / "edit.yaml").write_text(
        "sampling_mode: sample_proportional\ndatasets:\n"
        "  - {name: edit, path: edits.jsonl, sample_weight: 1.0, rewards: [{ocr: 1.0}]}\n", encoding="utf-8")
    return {"train": root / "train.yaml", "eval": root / "eval.yaml", "edit": root / "edit.yaml"}


# ----- flags ----------------------------------------------------------------------------------------------------------

def run_flags(settings: CheckSettings, paths, model_flags: dict, data: dict[str, Path], output_dir: Path,
              reward_url: str, judge_url: str, *, evaluate: bool, edit: bool = False) -> list[str]:
    """grpo_deepgen flags of the check's run: the guide's settings (reference optimizer-step schedule, beta 5e-7,
    SFT-aux 1e-4 on the shipped built-in images), bf16 (the weights; DeepSpeed follows), gradient checkpointing, streamed rewards, EMA, 2 steps with
    a checkpoint after the first. ``edit``: one step of the edit dataset at the edit step's smaller size."""
    prompts, group, steps = ((settings.edit_prompts, settings.edit_group, settings.edit_steps) if edit
                             else (settings.prompts, settings.group, settings.steps))
    images = prompts * group
    values = {
        "output_dir": output_dir, "deepspeed": ZERO2, "dataset_config": data["edit" if edit else "train"],
        "sd3_model_name_or_path": paths.sd3_dir, "qwen2_5_vl_model_name_or_path": paths.qwen_dir,
        "checkpoint": paths.checkpoint, "model_dtype": "bfloat16", "gradient_checkpointing": True,  # bf16 weights turn DeepSpeed bf16 on
        "image_height": settings.image_size, "image_width": settings.image_size, "num_inference_steps": steps,
        "timestep_fraction": 0.6, "atrain_sde_sampler": "cps_sde", "rollout_n": group, "global_batch_size": images,
        "rollout_micro_batch_size": images, "atrain_micro_batch_size": images, "optimizer_step_schedule": "reference",
        "beta": 5e-7, "sftaux_coef": 1e-4, "stream_rewards": True, "ema_decay": 0.99, "ema_device": "cpu",
        "sftaux_global_batch_size": 4,  # one GPU: the reference's 4 per GPU (the 8-GPU default is 32)
        "ema_update_every": settings.ema_update_every, "ocr_url": reward_url, "reward_health_timeout": 60,
        "eval_freq": 2 if evaluate else 0, "eval_before_train": False, "eval_dataset_config": data["eval"],
        "unigenbench_api_url": judge_url, "unigenbench_model_name": JUDGE_MODEL, "judge_health_timeout": 30,
        "max_steps": 1 if edit else 2, "save_strategy": "no" if edit else "steps", "save_steps": 1,
        "sample_image_freq": 0, "report_to": "none", "seed": 0, "disable_tqdm": True,
        **model_flags,
    }
    return [part for name, value in values.items() for part in (f"--{name}", str(value))]


# ----- compute model ------------------------------------------------------------------------------------------------

PROMPT_TOKENS = 64  # text tokens of a prompt as the memory estimator counts them (+ the meta queries)


def dit_forward_flops(transformer, num_queries: int, image_size: int, reference_images: int = 0) -> float:
    """FLOPs of one DiT forward of ONE sample: 2 x (block parameters) x tokens for the matrix products, plus the
    attention scores and their weighted sum, 4 x S^2 x D per joint block (and 4 x S_img^2 x D for each
    dual-attention block's image-only attention). S = image tokens (+ a reference image's, Kontext) + text tokens."""
    config = transformer.config
    side = image_size // 8 // config.patch_size
    image_tokens = side * side * (1 + reference_images)
    tokens = image_tokens + PROMPT_TOKENS + num_queries
    width = config.num_attention_heads * config.attention_head_dim
    block_params = sum(p.numel() for p in transformer.transformer_blocks.parameters())
    dual = len(getattr(config, "dual_attention_layers", ()) or ())
    return 2.0 * block_params * tokens + 4.0 * config.num_layers * tokens ** 2 * width + 4.0 * dual * image_tokens ** 2 * width


def phase_flops(per_forward: float, images: int, steps: int, trained_steps: int, *, checkpointing: bool,
                reference: bool) -> dict[str, float]:
    """Rollout: images x steps forwards. Train: per trained step and image a forward, a backward (2 forwards' worth),
    the checkpointed forward again, and the reference policy's forward when beta > 0."""
    train_factor = 3.0 + (1.0 if checkpointing else 0.0) + (1.0 if reference else 0.0)
    return {"rollout": per_forward * images * steps, "train": per_forward * images * trained_steps * train_factor}

"""Tiny, randomly initialised DeepGen parts built offline from configs in code.

They let the tests and the CPU quick start run the real code paths in seconds: ``save_tiny_deepgen`` writes
them in the real on-disk layouts (a diffusers SD3 folder, a transformers Qwen2.5-VL folder with a tokenizer,
a DeepGen ``.pth`` with the reference key names) so they load through ``load_deepgen_model`` like real weights.

    python -m deepgen_rl.model.tiny --output_dir outputs/tiny_models   # prints the env exports and flags
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..config import CHECKPOINT_ENV, QWEN_ENV, SD3_ENV
from .checkpoint_keys import to_reference_keys
from .connector import ConnectorConfig
from .deepgen import CHAT_TEMPLATE, GENERATION_TEMPLATE, NEGATIVE_PROMPT, DeepGenModel

# ModelArguments flags that describe the tiny connector (real defaults describe DeepGen_Image).
TINY_MODEL_FLAGS = {
    "num_queries": 8,
    "num_fusion_layers": 2,
    "connector_hidden_size": 32,
    "connector_intermediate_size": 64,
    "connector_num_layers": 2,
    "connector_num_heads": 2,
}
TINY_IMAGE_SIZE = 64  # pixels; 8x8 latents, 16 DiT tokens
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
_TOKENIZER_CORPUS = [
    CHAT_TEMPLATE.format(input=GENERATION_TEMPLATE.format(input="a red apple on a wooden table")),
    CHAT_TEMPLATE.format(input=NEGATIVE_PROMPT),
    "A cat holding a sign that says \"Hello DeepGen\" in a sunny street, photo, cartoon, painting.",
    "the quick brown fox jumps over the lazy dog; blue sky, green grass, two pandas, a robot, a city at night.",
]


@dataclass(frozen=True)
class TinyModelPaths:
    sd3_dir: Path
    qwen_dir: Path
    checkpoint: Path

    def env(self) -> dict[str, str]:
        """The environment variables a real run would export, pointing at the tiny parts."""
        return {SD3_ENV: str(self.sd3_dir), QWEN_ENV: str(self.qwen_dir), CHECKPOINT_ENV: str(self.checkpoint)}

    @staticmethod
    def model_flags() -> list[str]:
        return [part for name, value in TINY_MODEL_FLAGS.items() for part in (f"--{name}", str(value))]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory (no download) with the Qwen special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def build_tiny_lmm(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=640, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                           patch_size=14, spatial_merge_size=2, fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_sd3() -> tuple[SD3Transformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler]:
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=32, pos_embed_max_size=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return transformer, vae, scheduler


def build_tiny_deepgen(seed: int = 0) -> DeepGenModel:
    """A float32 CPU DeepGen model with every part tiny and random (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    transformer, vae, scheduler = build_tiny_sd3()
    model = DeepGenModel(
        lmm=build_tiny_lmm(tokenizer), tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler,
        connector_config=ConnectorConfig(
            hidden_size=TINY_MODEL_FLAGS["connector_hidden_size"],
            intermediate_size=TINY_MODEL_FLAGS["connector_intermediate_size"],
            num_hidden_layers=TINY_MODEL_FLAGS["connector_num_layers"],
            num_attention_heads=TINY_MODEL_FLAGS["connector_num_heads"],
        ),
        num_queries=TINY_MODEL_FLAGS["num_queries"],
        num_fusion_layers=TINY_MODEL_FLAGS["num_fusion_layers"],
    )
    # The real output projectors start at zero; a tiny random model would then ignore its prompt entirely
    # (and no gradient would reach the LLM), so give them small random weights instead.
    with torch.no_grad():
        for projector in (model.projector_2, model.projector_3):
            projector.weight.normal_(std=0.2)
    return model.eval()


def save_tiny_deepgen(output_dir: str | Path, seed: int = 0) -> TinyModelPaths:
    """Write a tiny model in the real layouts; returns where each part is."""
    root = Path(output_dir)
    paths = TinyModelPaths(root / "sd3", root / "qwen2_5_vl", root / "deepgen_tiny.pth")
    model = build_tiny_deepgen(seed)
    model.lmm.save_pretrained(paths.qwen_dir)
    model.tokenizer.save_pretrained(paths.qwen_dir)
    model.transformer.save_pretrained(paths.sd3_dir / "transformer")
    model.vae.save_pretrained(paths.sd3_dir / "vae")
    model.scheduler.save_pretrained(paths.sd3_dir / "scheduler")
    (paths.sd3_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
         "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        indent=2))
    torch.save(to_reference_keys(model.state_dict()), paths.checkpoint)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/tiny_models", help="Where to write the tiny parts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    paths = save_tiny_deepgen(args.output_dir, args.seed)
    for name, value in paths.env().items():
        print(f"export {name}={value}")
    print("# model flags:", " ".join(paths.model_flags()))


if __name__ == "__main__":
    main()

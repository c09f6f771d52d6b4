"""Tiny, randomly initialised DeepGen parts built offline from configs in code.

They let the tests and the CPU quick start run the real code paths in seconds: ``save_tiny_deepgen`` writes
them in the real on-disk layouts (a diffusers SD3 folder, a transformers Qwen2.5-VL folder with a tokenizer,
a DeepGen ``.pth`` with the reference key names) so they load through ``load_deepgen_model`` like real weights.

    python -m deepgen_rl.model.tiny --output_dir outputs/tiny_models   # prints the env exports and flags
    python -m deepgen_rl.model.tiny --output_dir outputs/tiny_pretrained --pretrain_steps 2000
        # pretrained on the synthetic prompt -> image task (model/tiny_pretrain.py; cached in --output_dir)
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..core.model_names import CHECKPOINT_ENV, QWEN_ENV, SD3_ENV
from .checkpoint_keys import to_reference_keys
from .connector import ConnectorConfig
from .deepgen import CHAT_TEMPLATE, GENERATION_TEMPLATE, DeepGenModel
from .kontext import SD3Transformer2DKontextModel

logger = logging.getLogger(__name__)

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
    # A fixed line of the corpus that decides the tiny vocabulary (it was once the CFG negative): changing it would
    # change every tiny token id, and with them every golden value of the tests.
    CHAT_TEMPLATE.format(input="Generate an image."),
    "A cat holding a sign that says \"Hello DeepGen\" in a sunny street, photo, cartoon, painting.",
    "the quick brown fox jumps over the lazy dog; blue sky, green grass, two pandas, a robot, a city at night.",
]


@dataclass(frozen=True)
class TinyModelPaths:
    sd3_dir: Path
    qwen_dir: Path
    checkpoint: Path

    @classmethod
    def under(cls, root: str | Path) -> "TinyModelPaths":
        """The layout ``save_deepgen_parts`` writes under ``root``."""
        root = Path(root)
        return cls(root / "sd3", root / "qwen2_5_vl", root / "deepgen_tiny.pth")

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


# The tiny VAE: 8 channels per level, 4 levels (8x upsampling as SD3's VAE), one ResNet per level
# (layers_per_block=0: half the convolutions of 1; decoding 64 images 0.30 s -> 0.14 s on one core, which is
# otherwise longer than the whole 4-step rollout of those images).
TINY_VAE_GROUPS = 4  # GroupNorm groups of 2 channels: one "signal" and one "carrier" (make_decoder_track_latents)
TINY_VAE_CARRIER_OFFSET = 2.0  # the carrier's +A / -A constants
# The untrained DiT's velocity head is scaled up so that its random output adds visible structure to the images:
# the headroom a few dozen GRPO steps can remove (see build_tiny_sd3).
TINY_DIT_OUTPUT_GAIN = 3.0


def make_decoder_track_latents(vae: AutoencoderKL) -> None:
    """Re-initialise ``vae.decoder`` (in place, from the global RNG) as a smooth, nearly linear decoder.

    WHY: a randomly initialised VAE decoder turns ANY latent, even an all-zero one, into a full-contrast texture:
    its random convolutions and biases create spatial patterns and every GroupNorm rescales them back to unit
    variance. Image statistics then hardly depend on the latent, so no image reward (the quick start's JPEG
    compressibility) can teach the DiT anything. Here the decoder is instead

        random 1x1 projection of the 16 latent channels onto one "signal" channel per GroupNorm group
        -> 3 x (nearest 2x upsampling + fixed [1, 2, 1] x [1, 2, 1] / 16 blur)      (bilinear-like, smooth)
        -> + per-channel constants (+A on the signal, -A on the other, "carrier", channel of its group)
        -> GroupNorm -> SiLU -> random 1x1 projection of the signal channels to RGB

    with every ResNet block an identity (conv2 zeroed: out = x + conv2(...) = x). The carrier makes each group's
    variance ~A^2 whatever the latent, so the last GroupNorm divides by a near-constant instead of re-amplifying
    small latent contrast, and the signal sits at ~+1 where SiLU is nearly linear. Net effect: a flat latent
    decodes to a flat grey image, latent contrast maps to image contrast (smooth colour blobs for noise latents),
    and the JPEG reward is monotone in the latent's contrast (seed 0: ~0.85 for N(0, 1) latents, ~0.88 at half
    that contrast, ~0.93 for a flat latent). The encoder keeps its random weights (only SFT-aux uses it).
    """
    decoder = vae.decoder
    channels, latent_channels = decoder.conv_in.out_channels, decoder.conv_in.in_channels
    per_group = channels // decoder.conv_norm_out.num_groups
    signal = torch.arange(channels) % per_group == 0
    num_signal = int(signal.sum())
    blur = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Upsample2D):
                module.conv.weight.zero_()
                module.conv.bias.zero_()
                for channel in range(channels):
                    module.conv.weight[channel, channel] = blur
        decoder.conv_in.weight.zero_()
        decoder.conv_in.bias.zero_()
        decoder.conv_in.weight[signal, :, 1, 1] = torch.randn(num_signal, latent_channels) / latent_channels ** 0.5
        decoder.up_blocks[-1].resnets[-1].conv2.bias.copy_(
            torch.where(signal, TINY_VAE_CARRIER_OFFSET, -TINY_VAE_CARRIER_OFFSET))
        to_rgb = torch.randn(decoder.conv_out.out_channels, num_signal)
        decoder.conv_out.weight.zero_()
        decoder.conv_out.weight[:, signal, 1, 1] = to_rgb
        # Centre the output: a zero-contrast latent gives normalised signal +1, i.e. SiLU(1) before conv_out.
        decoder.conv_out.bias.copy_(-to_rgb.sum(dim=1) * torch.nn.functional.silu(torch.tensor(1.0)))


@dataclass(frozen=True)
class TinyDiTSize:
    """The tiny DiT's depth and attention heads; its width (joint / caption / pooled dims too) is
    num_heads * head_dim. The default is the untrained test model; the pretrained quick-start model is
    bigger (model/tiny_pretrain.py: a 2-layer, 32-wide DiT did not learn to follow the synthetic prompts)."""

    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


def build_tiny_sd3(dit_size: TinyDiTSize = TinyDiTSize()
                   ) -> tuple[SD3Transformer2DKontextModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler]:
    transformer = SD3Transformer2DKontextModel(
        sample_size=TINY_IMAGE_SIZE // 8, patch_size=2, in_channels=16, out_channels=16,
        num_layers=dit_size.num_layers, attention_head_dim=dit_size.head_dim, num_attention_heads=dit_size.num_heads,
        joint_attention_dim=dit_size.width, caption_projection_dim=dit_size.width,
        pooled_projection_dim=dit_size.width, pos_embed_max_size=32,
    )
    # WHY: a 2-layer random DiT cannot learn to denoise in a few dozen RL steps; what GRPO does learn quickly is
    # to stop its random velocity from adding structure to x0_hat = x - sigma v. At the default init that random
    # part is small (the policy starts near its quick optimum: +0.004 JPEG reward in 30 steps); scaled 3x, the
    # untrained policy made busier images and 30 GRPO steps raised the JPEG reward by +0.011 to +0.023 (~20x the
    # step-to-step noise). The learning test and the quick start now use the pretrained model
    # (model/tiny_pretrain.py); this gain and the decoder below stay because the pinned golden runs
    # (tests/test_trainer_inprocess.py and others) were measured on this model.
    with torch.no_grad():
        transformer.proj_out.weight.mul_(TINY_DIT_OUTPUT_GAIN)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=0, norm_num_groups=TINY_VAE_GROUPS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    make_decoder_track_latents(vae)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return transformer, vae, scheduler


def build_tiny_deepgen(seed: int = 0, dit_size: TinyDiTSize = TinyDiTSize()) -> DeepGenModel:
    """A float32 CPU DeepGen model with every part tiny and random (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    transformer, vae, scheduler = build_tiny_sd3(dit_size)
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


def save_deepgen_parts(model: DeepGenModel, output_dir: str | Path,
                       extra_checkpoint: dict[str, torch.Tensor] | None = None) -> TinyModelPaths:
    """Write ``model``'s parts in the real layouts under ``output_dir``; returns where each part is.
    ``extra_checkpoint``: more CHECKPOINT tensors, in their checkpoint names (e.g. an LLM LoRA's factors)."""
    paths = TinyModelPaths.under(output_dir)
    model.lmm.save_pretrained(paths.qwen_dir)
    model.tokenizer.save_pretrained(paths.qwen_dir)
    model.transformer.save_pretrained(paths.sd3_dir / "transformer")
    model.vae.save_pretrained(paths.sd3_dir / "vae")
    model.scheduler.save_pretrained(paths.sd3_dir / "scheduler")
    (paths.sd3_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
         "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        indent=2))
    torch.save({**to_reference_keys(model.state_dict()), **(extra_checkpoint or {})}, paths.checkpoint)
    return paths


def save_tiny_deepgen(output_dir: str | Path, seed: int = 0) -> TinyModelPaths:
    """Write a tiny model in the real layouts; returns where each part is."""
    from .tiny_pretrain import PRETRAIN_RECORD

    # Untrained weights over a pretrained folder: its record must not make a later call reuse them as pretrained.
    (Path(output_dir) / PRETRAIN_RECORD).unlink(missing_ok=True)
    return save_deepgen_parts(build_tiny_deepgen(seed), output_dir)


def save_pretrained_tiny_deepgen(output_dir: str | Path, settings, seed: int = 0) -> TinyModelPaths:
    """The tiny model pretrained on the synthetic task (model/tiny_pretrain.py), written under ``output_dir``;
    reused as is when ``output_dir`` already holds one pretrained with the same settings and seed."""
    from .tiny_pretrain import PRETRAIN_RECORD, cached_record, pretrain_tiny_deepgen

    root = Path(output_dir)
    paths = TinyModelPaths.under(root)
    if cached_record(root, settings, seed) is not None and paths.checkpoint.is_file():
        logger.info("reusing the pretrained tiny model in %s (%s)", root, PRETRAIN_RECORD)
        return paths
    (root / PRETRAIN_RECORD).unlink(missing_ok=True)  # written last: a half-written folder is never reused
    model = build_tiny_deepgen(seed, TinyDiTSize(settings.dit_layers, settings.dit_heads, settings.dit_head_dim))
    record = pretrain_tiny_deepgen(model, settings)
    save_deepgen_parts(model, root)
    (root / PRETRAIN_RECORD).write_text(json.dumps({**record, "model_seed": seed}, indent=2))
    return paths


def main() -> None:
    from .tiny_pretrain import PretrainSettings

    parser = argparse.ArgumentParser(prog="python -m deepgen_rl.model.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/tiny_models", help="Where to write the tiny parts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="Flow-matching steps on the synthetic task (model/tiny_pretrain.py) before saving; "
                             "0: the untrained tiny model. The result is cached in --output_dir.")
    parser.add_argument("--pretrain_vae_steps", type=int, default=PretrainSettings.vae_steps,
                        help="Autoencoder steps of the tiny VAE before the flow-matching steps.")
    args = parser.parse_args()
    if args.pretrain_steps < 0:
        parser.error(f"--pretrain_steps must be >= 0; got {args.pretrain_steps}.")
    if args.pretrain_steps:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        settings = PretrainSettings(steps=args.pretrain_steps, vae_steps=args.pretrain_vae_steps, seed=args.seed)
        paths = save_pretrained_tiny_deepgen(args.output_dir, settings, args.seed)
    else:
        paths = save_tiny_deepgen(args.output_dir, args.seed)
    for name, value in paths.env().items():
        print(f"export {name}={value}")
    print("# model flags:", " ".join(paths.model_flags()))


if __name__ == "__main__":
    main()

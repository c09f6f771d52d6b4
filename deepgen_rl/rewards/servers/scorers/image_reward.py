"""``image_reward``: ImageReward (Xu et al. 2023): BLIP's ViT-L image tower, its BERT text encoder attending to the
image, and a linear MLP on the text's first ([CLS]) token, standardised as published:

    score_i = (MLP(BERT(p_i | ViT(x_i))[:, 0]) - 0.16717362830052426) / 1.0333394966054072     (about -2.5..2.5)

``ImageReward.pt`` is mapped onto transformers' BlipVisionModel / BlipTextModel (``blip_keys``). Text: the
bert-base-uncased tokenizer plus BLIP's two added tokens ([DEC] as bos, [ENC]), padded to 35 tokens as published;
images: resize (bicubic) + centre crop to the model's size, CLIP's mean/std.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from deepgen_rl.rewards.servers.scorers.blip_keys import HEAD, blip_configs, map_image_reward_to_hf
from deepgen_rl.rewards.servers.scorers.checkpoints import load_exactly, read_state_dict, require_path
from deepgen_rl.rewards.servers.scorers.mlp_head import LinearHead, head_shapes

NAME = "image_reward"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published standardisation
MAX_TEXT_TOKENS = 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

logger = logging.getLogger("deepgen_rl.scorer_server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--imagereward-checkpoint", default=os.environ.get("IMAGEREWARD_CHECKPOINT", ""),
                       help="ImageReward.pt ($IMAGEREWARD_CHECKPOINT)")
    group.add_argument("--imagereward-tokenizer-path", default=os.environ.get("IMAGEREWARD_TOKENIZER_PATH", ""),
                       help="local bert-base-uncased tokenizer folder ($IMAGEREWARD_TOKENIZER_PATH)")


class ImageRewardModel(nn.Module):
    """pixel_values [n, 3, S, S], input_ids / attention_mask [n, 35] -> standardised scores [n]."""

    def __init__(self, vision_config, text_config, head_layers: dict[int, tuple[int, int]]) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = LinearHead(head_layers)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [n, 1 + g*g, Wv]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return (self.mlp(text.last_hidden_state[:, 0]).float() - SCORE_MEAN) / SCORE_STD  # [CLS] features -> [n]


def load_image_reward_model(checkpoint: str, setting: str = "--imagereward-checkpoint / IMAGEREWARD_CHECKPOINT"):
    """ImageRewardModel with every parameter from the checkpoint file (the unused BLIP parts skipped, logged)."""
    state = read_state_dict(checkpoint, NAME, setting)
    mapped, skipped = map_image_reward_to_hf(state)
    source = f"{NAME} checkpoint {checkpoint} ({setting})"
    head = {k[len(HEAD):]: v for k, v in mapped.items() if k.startswith(HEAD)}
    model = ImageRewardModel(*blip_configs(state), head_shapes(head, source))
    load_exactly(model, mapped, source)
    if skipped:
        logger.info("%s: %d checkpoint tensors the score does not use were skipped (e.g. %s)", NAME, len(skipped),
                    skipped[0])
    return model.eval()


def load_blip_tokenizer(path: str, vocab_size: int):
    """bert-base-uncased + BLIP's added [DEC] (bos) and [ENC] tokens, as ImageReward's BLIP builds it."""
    from transformers import AutoTokenizer

    setting = "--imagereward-tokenizer-path / IMAGEREWARD_TOKENIZER_PATH"
    require_path(path, NAME, setting, kind="folder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{NAME}: the tokenizer at {setting} = {path!r} has {len(tokenizer)} tokens with BLIP's "
                         f"two added ones, the checkpoint's text encoder {vocab_size}: use bert-base-uncased.")
    return tokenizer


class ImageRewardScorer:
    name = NAME

    def __init__(self, checkpoint: str, tokenizer_path: str, device: str, dtype: torch.dtype) -> None:
        from transformers.models.clip import CLIPImageProcessorPil

        self.model = load_image_reward_model(checkpoint).to(device, dtype)
        self.tokenizer = load_blip_tokenizer(tokenizer_path, self.model.text_encoder.config.vocab_size)
        size = self.model.vision_model.config.image_size
        self.image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size,
                                                     "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD)

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        device, dtype = self.model.vision_model.device, self.model.vision_model.dtype
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        return self.model(pixels.to(device, dtype), tokens["input_ids"].to(device),
                          tokens["attention_mask"].to(device)).tolist()


def load(args: argparse.Namespace, device: str, dtype: torch.dtype) -> ImageRewardScorer:
    return ImageRewardScorer(args.imagereward_checkpoint, args.imagereward_tokenizer_path, device, dtype)

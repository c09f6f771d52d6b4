"""``hpsv2``: Human Preference Score v2.1 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

    score_i = cos(f_img(x_i), f_txt(p_i))      (the published inference: no logit scale; about 0.2-0.35 in practice)

``HPS_v2.1_compressed.pt`` (a ``{"state_dict": ...}`` of open_clip keys) is mapped onto a transformers CLIPModel
(``open_clip_keys``); tokenizer and image preprocessing come from a local CLIP-ViT-H-14 processor folder
(``--hpsv2-processor-path``). One departure: HPSv2 pads a non-square image to a square where the CLIP processor
centre-crops it; generated images are square, where the two agree.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
from PIL import Image

from deepgen_rl.rewards.servers.scorers.checkpoints import load_exactly, read_state_dict
from deepgen_rl.rewards.servers.scorers.clip_common import check_image_size, cosine_scores, load_clip_processor
from deepgen_rl.rewards.servers.scorers.open_clip_keys import clip_config_from_open_clip, map_open_clip_to_hf

NAME = "hpsv2"
# ViT-H-14 (open_clip's model config): image tower 1280 wide with 80-wide heads, text tower 1024 wide, 64-wide heads.
VISION_HEAD_WIDTH, TEXT_HEAD_WIDTH = 80, 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--hpsv2-checkpoint", default=os.environ.get("HPSV2_CHECKPOINT", ""),
                       help="HPS_v2.1_compressed.pt ($HPSV2_CHECKPOINT)")
    group.add_argument("--hpsv2-processor-path", default=os.environ.get("HPSV2_PROCESSOR_PATH", ""),
                       help="local CLIP-ViT-H-14 processor folder: tokenizer + preprocessor ($HPSV2_PROCESSOR_PATH)")


def load_hpsv2_model(checkpoint: str, tokenizer, setting: str = "--hpsv2-checkpoint / HPSV2_CHECKPOINT"):
    """A transformers CLIPModel holding the open_clip checkpoint's weights (every parameter from the file)."""
    from transformers import CLIPModel

    state = read_state_dict(checkpoint, NAME, setting)
    config = clip_config_from_open_clip(state, VISION_HEAD_WIDTH, TEXT_HEAD_WIDTH, tokenizer.bos_token_id,
                                        tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
    model = CLIPModel(config)
    load_exactly(model, map_open_clip_to_hf(state), f"{NAME} checkpoint {checkpoint} ({setting})")
    return model.eval()


class HpsV2Scorer:
    name = NAME

    def __init__(self, checkpoint: str, processor_path: str, device: str, dtype: torch.dtype) -> None:
        processor_setting = "--hpsv2-processor-path / HPSV2_PROCESSOR_PATH"
        self.processor = load_clip_processor(processor_path, NAME, processor_setting)
        self.model = load_hpsv2_model(checkpoint, self.processor.tokenizer).to(device, dtype)
        check_image_size(self.processor, self.model, NAME, processor_setting)

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return cosine_scores(self.model, self.processor, images, prompts).tolist()


def load(args: argparse.Namespace, device: str, dtype: torch.dtype) -> HpsV2Scorer:
    return HpsV2Scorer(args.hpsv2_checkpoint, args.hpsv2_processor_path, device, dtype)

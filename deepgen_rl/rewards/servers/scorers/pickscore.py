"""``pickscore``: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences.

    score_i = exp(logit_scale) * cos(f_img(x_i), f_txt(p_i))      (the published inference; about 18-24 in practice)

The model is a transformers CLIPModel folder (PickScore_v1) and the processor the CLIP-ViT-H-14 one it was trained
with (``--pickscore-processor-path``; default: the model folder, when the processor files were saved with it).
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
from PIL import Image

from deepgen_rl.rewards.servers.scorers.checkpoints import require_path
from deepgen_rl.rewards.servers.scorers.clip_common import check_image_size, cosine_scores, load_clip_processor

NAME = "pickscore"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--pickscore-model-path", default=os.environ.get("PICKSCORE_MODEL_PATH", ""),
                       help="local transformers folder of PickScore_v1 ($PICKSCORE_MODEL_PATH)")
    group.add_argument("--pickscore-processor-path", default=os.environ.get("PICKSCORE_PROCESSOR_PATH", ""),
                       help="local CLIP-ViT-H-14 processor folder ($PICKSCORE_PROCESSOR_PATH; default: the model folder)")


class PickScoreScorer:
    name = NAME

    def __init__(self, model_path: str, processor_path: str, device: str, dtype: torch.dtype) -> None:
        from transformers import CLIPModel

        setting = "--pickscore-model-path / PICKSCORE_MODEL_PATH"
        require_path(model_path, NAME, setting, kind="folder")
        processor_setting = "--pickscore-processor-path / PICKSCORE_PROCESSOR_PATH"
        self.processor = load_clip_processor(processor_path or model_path, NAME,
                                             processor_setting if processor_path else setting)
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True, dtype=dtype).to(device).eval()
        check_image_size(self.processor, self.model, NAME, processor_setting)

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        scale = self.model.logit_scale.float().exp()
        return (scale * cosine_scores(self.model, self.processor, images, prompts)).tolist()


def load(args: argparse.Namespace, device: str, dtype: torch.dtype) -> PickScoreScorer:
    return PickScoreScorer(args.pickscore_model_path, args.pickscore_processor_path, device, dtype)

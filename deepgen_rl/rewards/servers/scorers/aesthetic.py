"""``aesthetic``: the LAION improved aesthetic predictor (Schuhmann et al.), a linear MLP on CLIP ViT-L/14 image
embeddings, trained on SAC + LOGOS + AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``).

    score_i = MLP(f_img(x_i) / ||f_img(x_i)||)      (about 1-10; the prompt is not used)

The CLIP model is a local transformers folder of openai/clip-vit-large-patch14 (``--aesthetic-clip-path``; default
CLIP_MODEL_NAME_OR_PATH, the folder training's clip_sim reward uses); the MLP keys are ``mlp_head``'s layout.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
from PIL import Image

from deepgen_rl.rewards.servers.scorers.checkpoints import read_state_dict, require_path
from deepgen_rl.rewards.servers.scorers.clip_common import check_image_size, clip_image_embeddings, load_clip_processor
from deepgen_rl.rewards.servers.scorers.mlp_head import head_from_state_dict

NAME = "aesthetic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--aesthetic-mlp-path", default=os.environ.get("AESTHETIC_MLP_PATH", ""),
                       help="sac+logos+ava1-l14-linearMSE.pth ($AESTHETIC_MLP_PATH)")
    group.add_argument("--aesthetic-clip-path",
                       default=os.environ.get("AESTHETIC_CLIP_PATH", os.environ.get("CLIP_MODEL_NAME_OR_PATH", "")),
                       help="local transformers folder of clip-vit-large-patch14 with its processor "
                            "($AESTHETIC_CLIP_PATH, else $CLIP_MODEL_NAME_OR_PATH)")


class AestheticScorer:
    name = NAME

    def __init__(self, mlp_path: str, clip_path: str, device: str, dtype: torch.dtype) -> None:
        from transformers import CLIPModel

        clip_setting = "--aesthetic-clip-path / AESTHETIC_CLIP_PATH"
        mlp_setting = "--aesthetic-mlp-path / AESTHETIC_MLP_PATH"
        require_path(clip_path, NAME, clip_setting, kind="folder")
        self.processor = load_clip_processor(clip_path, NAME, clip_setting)
        self.model = CLIPModel.from_pretrained(clip_path, local_files_only=True, dtype=dtype).to(device).eval()
        check_image_size(self.processor, self.model, NAME, clip_setting)
        self.head = head_from_state_dict(read_state_dict(mlp_path, NAME, mlp_setting), f"{NAME} MLP {mlp_path}")
        width = self.model.config.projection_dim
        if self.head.layers[0].in_features != width:
            raise ValueError(f"{NAME}: the MLP at {mlp_setting} takes {self.head.layers[0].in_features}-wide "
                             f"embeddings but the CLIP model at {clip_setting} gives {width} (ViT-L/14 gives 768).")
        self.head.to(device)

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        embeddings = clip_image_embeddings(self.model, self.processor, images)  # [n, D], float32
        return self.head(embeddings).tolist()


def load(args: argparse.Namespace, device: str, dtype: torch.dtype) -> AestheticScorer:
    return AestheticScorer(args.aesthetic_mlp_path, args.aesthetic_clip_path, device, dtype)

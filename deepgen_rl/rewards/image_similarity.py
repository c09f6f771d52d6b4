"""``image_similarity`` reward: CLIP image-image cosine similarity between an edit's source and its result.

    r_i = <f_img(x_i), f_img(s_i)> / (||f_img(x_i)|| ||f_img(s_i)||)   in [-1, 1]

with f_img the projected CLIP image embedding of rewards/clip_sim.py (same model folder, CLIP_MODEL_NAME_OR_PATH)
and s_i the FIRST source image of sample i (the image being edited; further sources are references to take
content from, not to stay close to). A consistency term: it rewards keeping the source, so weight it below an
instruction-following reward (edit_vlm_judge) or the policy learns to return the source unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch
from deepgen_rl.rewards.clip_sim import ClipSimilarityReward


class ImageSimilarityReward(ClipSimilarityReward):
    name = "image_similarity"
    score_range = (-1.0, 1.0)  # a cosine similarity
    needs_sources = True  # the reward step passes each sample's source images (``sources=``)

    @torch.no_grad()
    def image_similarities(self, images: Sequence[Image.Image], sources: Sequence[Image.Image]) -> torch.Tensor:
        """Cosine similarities [n] of each image with its source."""
        pixels = self.processor(images=[im.convert("RGB") for im in [*images, *sources]], return_tensors="pt")
        features = self.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype)).pooler_output.float()  # [2n, D]
        return torch.nn.functional.cosine_similarity(features[: len(images)], features[len(images):], dim=-1)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int],
              sources: Optional[Sequence[Sequence[Image.Image]]] = None) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        if sources is None or len(sources) != n or any(len(row) == 0 for row in sources):
            return RewardScores.all_failed(n, "image_similarity needs each sample's source images: use it only on "
                                              "edit datasets (JSONL with source_images)")
        first_sources = [row[0] for row in sources]
        return self.score_in_batches(
            n, lambda rows: self.image_similarities(images[rows], first_sources[rows]), "CLIP image similarity")

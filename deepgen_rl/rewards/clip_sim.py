"""``clip_sim``: CLIP image-text cosine similarity, computed in-process from a local CLIP folder.

    r_i = <f_img(x_i), f_txt(p_i)> / (||f_img(x_i)|| ||f_txt(p_i)||)   in [-1, 1]

with f_img = visual_projection(vision_model(x).pooler_output) and f_txt = text_projection(text_model(p).pooler_output)
(CLIP, Radford et al. 2021, eq. of the contrastive logits without the temperature). The folder is the one the
guide exports as CLIP_MODEL_NAME_OR_PATH (e.g. clip-vit-large-patch14: model + processor files); it is read with
``local_files_only`` so nothing is downloaded at run time. Prompts longer than the text encoder's positions are
truncated, as CLIP itself must.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from deepgen_rl.rewards.base import RewardScores, check_batch


class ClipSimilarityReward:
    name = "clip_sim"
    score_range = (-1.0, 1.0)  # a cosine similarity

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        if not model_path:
            raise ValueError(f"the {self.name} reward needs a local CLIP model folder: export CLIP_MODEL_NAME_OR_PATH "
                             "or pass --clip_model_name_or_path.")
        if not Path(model_path).is_dir():
            raise ValueError(f"--clip_model_name_or_path / CLIP_MODEL_NAME_OR_PATH={model_path!r} is not a folder "
                             "(expected a local transformers CLIP folder with config.json and the processor files).")
        self.device = torch.device(device)
        self.service = f"in-process CLIP model {model_path} (CLIP_MODEL_NAME_OR_PATH)"
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)
        self._lock = threading.Lock()  # one scoring call at a time on the shared model

    def check_ready(self) -> None:
        """Nothing to check: the model was loaded (or failed loudly) in the constructor."""

    @torch.no_grad()
    def similarities(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities [n] of each image with its prompt."""
        inputs = self.processor(text=list(prompts), images=[im.convert("RGB") for im in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_text_length)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        # Since transformers 5 these return the model output, the projected features as its pooler_output.
        image_features = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype))
        text_features = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"])
        image_features, text_features = image_features.pooler_output, text_features.pooler_output  # [n, D] each
        return torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], group_ids: Sequence[int]) -> RewardScores:
        n = check_batch(images, prompts, group_ids)
        return self.score_in_batches(n, lambda rows: self.similarities(images[rows], prompts[rows]), "CLIP similarity")

    def score_in_batches(self, n: int, compute: Callable[[slice], torch.Tensor], what: str) -> RewardScores:
        """Run ``compute(rows)`` -> [len(rows)] over n samples in --clip batches, one call at a time on the shared
        model; a batch that raises fails only its own samples (with ``what`` and the error), never scores 0."""
        values: list[Optional[float]] = [None] * n
        errors: list[Optional[str]] = [None] * n
        with self._lock:
            for start in range(0, n, self.batch_size):
                rows = slice(start, min(start + self.batch_size, n))
                try:
                    values[rows] = compute(rows).tolist()
                except (RuntimeError, ValueError, OSError) as err:
                    errors[rows] = [f"{what} failed: {type(err).__name__}: {err}"] * (rows.stop - start)
        return RewardScores(values=values, errors=errors)

    def close(self) -> None:
        self.model = None

"""The source conditioning of a rollout's edit rows, carried from rollout to reward and to every recompute.

Legend: B prompts, G = rollout_n images per prompt, N = B*G rows (a prompt's G rows adjacent, as the rollout
lays them out). A text-to-image row has no sources. Each prompt's source images are decoded and VAE-encoded ONCE
and shared by its G rows (the same tensors, not copies):

    source_images      per row: [3, H_r, W_r] float in [0, 1]   (the LLM's vision tower and the edit rewards)
    reference_latents  per row: [C, h_r, w_r]                   (the DiT's reference tokens, posterior mean:
                                                                 deterministic, so recompute sees the rollout's)

The recorded prompt embeddings of an edit row already hold the vision tower's contribution; the DiT needs the
reference latents at every step, in rollout and in training, or the first chunk's ratio is not 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from deepgen_rl.data.edit_prompts import load_source_image
from deepgen_rl.data.prompts import PromptSample


@dataclass
class EditConditioning:
    source_images: list[list[torch.Tensor]]  # [N] lists of [3, H_r, W_r]
    reference_latents: list[list[torch.Tensor]]  # [N] lists of [C, h_r, w_r]

    def __post_init__(self) -> None:
        if len(self.source_images) != len(self.reference_latents):
            raise ValueError(f"{len(self.source_images)} rows of source images but {len(self.reference_latents)} "
                             "rows of reference latents")

    def __len__(self) -> int:
        return len(self.source_images)

    @property
    def edit_rows(self) -> list[int]:
        return [row for row, sources in enumerate(self.source_images) if sources]

    def select(self, rows: Sequence[int]) -> "EditConditioning":
        """The conditioning of ``rows`` (a micro-batch or training chunk), in that order."""
        return EditConditioning([self.source_images[r] for r in rows], [self.reference_latents[r] for r in rows])

    def dit_references(self) -> list[list[torch.Tensor]] | None:
        """``predict_velocity``'s ``reference_latents``: None when no row is an edit (the text-to-image forward)."""
        return self.reference_latents if self.edit_rows else None

    def source_pil(self) -> list[list[Image.Image]]:
        """Per row its sources as PIL images (the edit rewards' ``sources=``)."""
        return [[_to_pil(image) for image in row] for row in self.source_images]


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def build_edit_conditioning(model, samples: Sequence[PromptSample], group_size: int,
                            target_area: int) -> EditConditioning:
    """Per prompt (B samples), its sources decoded at ~``target_area`` pixels (sides multiples of
    ``model.source_side_multiple``: 32 for the real model, the unit DeepGen resizes its sources to) and
    VAE-encoded, repeated for its ``group_size`` rows -> N = B * G rows."""
    multiple = model.source_side_multiple
    sources, latents = [], []
    for sample in samples:
        images = [load_source_image(path, target_area, multiple) for path in sample.source_images]
        encoded = model.encode_reference_images(images) if images else []
        sources += [images] * group_size
        latents += [encoded] * group_size
    return EditConditioning(sources, latents)

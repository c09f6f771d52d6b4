"""What a GRPO step's rollout phase hands to decoding, rewards and the update (legend: B prompts, N = B*G rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deepgen_rl.data import PromptSample
from deepgen_rl.sampling import Trajectory

from .streaming import RewardStream


@dataclass
class RolloutBatch:
    """This rank's rollout: B prompt samples (each with dataset + reward weights) and the N-row trajectory."""

    samples: list[PromptSample]
    trajectory: Trajectory
    images: Optional[torch.Tensor] = None  # [N, 3, H, W] in [0, 1]
    truncated_prompts: int = 0  # of the B prompts, cut to --max_prompt_length (their user text only)
    sde_window: Optional[tuple[int, int]] = None  # (start, end) of the SDE window; None: every step SDE
    rewards_in_flight: Optional[RewardStream] = None  # --stream_rewards: the chunks scored during the rollout
    prompt_length: int = 0  # the step's global padded prompt length (model/prompt_padding.py)

    @property
    def unique_prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

"""Rewards streamed per rollout micro-batch (--stream_rewards, default on): the GPU samples the next micro-batch
while the previous one's images are scored (Flow-Factory ``async_reward``, MM-GRPO streaming).

The rollout calls ``RewardStream.on_micro_batch`` after each forward micro-batch; every group completed by then
(rows are group-aligned: a chunk holds whole groups, so pairwise rewards and group statistics see complete groups)
is decoded at once and handed to ``RewardStep.submit`` (a background thread; HTTP calls in flight meanwhile).
``result()`` waits only for what is still being scored and merges the chunks into the rank's RewardBatch.

The serial path (--stream_rewards false) decodes the SAME chunks (``decode_chunks``) and scores the whole batch in
one call, so both give identical images, rewards, failures and advantages for one seed (tests/test_streaming.py).
Legend: N samples of this rank, G group size, C/h/w latent, H/W image.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Optional, Sequence

import torch
from torch import Tensor

from deepgen_rl.data import PromptSample
from deepgen_rl.rewards.reward_merge import merge_reward_batches
from deepgen_rl.rewards.reward_step import RewardBatch
from deepgen_rl.sampling import decode_images
from deepgen_rl.sampling.edit_conditioning import EditConditioning
from deepgen_rl.trainer.edit_rollout import row_sources, row_targets

logger = logging.getLogger(__name__)


def reward_chunks(num_samples: int, micro_batch_size: int, group_size: int) -> list[slice]:
    """Consecutive row chunks, each ending where a rollout micro-batch ends, rounded down to whole groups: with
    micro = k G the micro-batches themselves; otherwise each chunk holds the groups completed by then."""
    ends: list[int] = []
    for end in range(micro_batch_size, num_samples + micro_batch_size, micro_batch_size):
        aligned = min(end, num_samples) // group_size * group_size
        if aligned > (ends[-1] if ends else 0):
            ends.append(aligned)
    return [slice(start, end) for start, end in zip([0] + ends[:-1], ends)]


def log_chunking(micro_batch_size: int, group_size: int, stream: bool) -> None:
    """Once per run: say how rewards are streamed when micro-batches do not hold whole groups."""
    if stream and micro_batch_size % group_size:
        logger.info("--rollout_micro_batch_size %d is not a multiple of --rollout_n %d: rewards are streamed in "
                    "group-aligned chunks (the groups each micro-batch completes).", micro_batch_size, group_size)


def decode_chunks(model, final_latents: Tensor, chunks: Sequence[slice], decode_micro_batch_size: int) -> Tensor:
    """[N, C, h, w] -> images [N, 3, H, W], decoded chunk by chunk as the streamed path decodes them."""
    return torch.cat([decode_images(model, final_latents[chunk], decode_micro_batch_size) for chunk in chunks])


class RewardStream:
    """One GRPO step's streamed reward phase on this rank (create it before the rollout, pass ``on_micro_batch``)."""

    def __init__(self, model, reward_step, samples: Sequence[PromptSample], group_size: int, micro_batch_size: int,
                 decode_micro_batch_size: int, edit: Optional[EditConditioning] = None) -> None:
        self.model, self.reward_step = model, reward_step
        self.edit = edit  # the rollout's source conditioning: each chunk's rows go to the edit rewards
        self.targets = row_targets(samples, group_size)
        self.decode_micro_batch_size = decode_micro_batch_size
        self.prompts = [s.prompt for s in samples for _ in range(group_size)]
        self.weights = [s.reward_weights for s in samples for _ in range(group_size)]
        self.group_ids = [row // group_size for row in range(len(self.prompts))]
        self.chunks = reward_chunks(len(self.prompts), micro_batch_size, group_size)
        self._pending: list[Tensor] = []  # x_T of rows sampled but not yet in a submitted chunk
        self._pending_start = self._sampled = 0
        self._images: list[Tensor] = []
        self._futures: list["Future[RewardBatch]"] = []

    def on_micro_batch(self, rows: slice, final_latents: Tensor) -> None:
        """The rollout finished ``rows`` (x_T [n, C, h, w]): decode and submit every chunk now complete."""
        if rows.start != self._sampled:
            raise RuntimeError(f"rollout micro-batches must arrive in order: expected row {self._sampled}, got "
                               f"{rows.start}.")
        self._pending.append(final_latents)
        self._sampled = rows.stop
        while len(self._futures) < len(self.chunks) and self.chunks[len(self._futures)].stop <= self._sampled:
            chunk = self.chunks[len(self._futures)]
            pending = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            split = chunk.stop - self._pending_start
            latents, rest = pending[:split], pending[split:]
            self._pending, self._pending_start = ([rest] if len(rest) else []), chunk.stop
            images = decode_images(self.model, latents, self.decode_micro_batch_size)
            self._images.append(images)
            self._futures.append(self.reward_step.submit(images, self.prompts[chunk], self.weights[chunk],
                                                         self.group_ids[chunk], row_sources(self.edit, chunk),
                                                         None if self.targets is None else self.targets[chunk]))

    @property
    def images(self) -> Tensor:
        """[N, 3, H, W] every chunk's decoded images (after the rollout)."""
        return torch.cat(self._images)

    def result(self) -> RewardBatch:
        """Wait for the chunks still being scored; the rank's RewardBatch (rows in rollout order)."""
        if len(self._futures) != len(self.chunks):
            raise RuntimeError(f"the rollout handed over {len(self._futures)} of {len(self.chunks)} reward chunks.")
        return merge_reward_batches([future.result() for future in self._futures])

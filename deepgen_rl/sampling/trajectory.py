"""Typed records passed from the rollout to the trainer.

Shape legend: B prompts, G group size, N = B * G samples (the G copies of a prompt adjacent), T steps,
C/h/w latent channels/height/width, L/L' prompt/negative-prompt tokens, D/D' sequence/pooled widths,
H/W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import Tensor

from deepgen_rl.sampling.steps import LogProbVariant, Sampler

if TYPE_CHECKING:
    from deepgen_rl.sampling.edit_conditioning import EditConditioning

Rows = Union[slice, Sequence[int], Tensor]


def pick_rows(items: list, rows: Rows) -> list:
    """The items of a python list at ``rows`` (slice, index list or index tensor), in that order."""
    if isinstance(rows, slice):
        return items[rows]
    if isinstance(rows, Tensor):
        rows = rows.nonzero().flatten().tolist() if rows.dtype == torch.bool else rows.tolist()
    return [items[r] for r in rows]


@dataclass(frozen=True)
class SamplerSettings:
    """How a trajectory was sampled; training must recompute with the very same settings (ratio 1 at step one)."""

    sampler: Sampler
    eta: float
    logprob_variant: LogProbVariant
    cfg_scale: float  # 0 = no CFG
    # Rows per DiT forward (None: a micro-batch at once). In bf16 a forward's result depends on how many rows it
    # runs (the kernels block differently), so the rollout records with the training chunk's forward size and
    # the training recompute uses the same: the first chunk's ratio is then 1 to fp32 rounding in bf16 too.
    forward_rows: Optional[int] = None


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of n samples (n = N or a micro-batch of it).

    prompt_embeds: [n, L, D]; pooled: [n, D']; negative_*: the CFG negatives' embeddings ([n, L, D], [n, D'],
    possibly expanded views; encoded in the positives' batch, so of the same length L) or None when CFG is off:
    ``chat_text("")`` for text-to-image, the row's own sources with an empty instruction for an edit.
    references: editing only, per row its source latents [C, h_r, w_r] for the DiT (both CFG branches see them:
    only the instruction is dropped), None for text-to-image (whose DiT call then stays diffusers' SD3 forward).
    """

    prompt_embeds: Tensor
    pooled: Tensor
    negative_prompt_embeds: Optional[Tensor] = None
    negative_pooled: Optional[Tensor] = None
    references: Optional[list] = None

    def select(self, rows: Rows) -> "Conditioning":
        """The conditioning of a subset of samples (slice, index list or index tensor)."""
        neg = self.negative_prompt_embeds
        neg_pooled = self.negative_pooled
        return Conditioning(
            prompt_embeds=self.prompt_embeds[rows],
            pooled=self.pooled[rows],
            negative_prompt_embeds=None if neg is None else neg[rows],
            negative_pooled=None if neg_pooled is None else neg_pooled[rows],
            references=None if self.references is None else pick_rows(self.references, rows),
        )


@dataclass
class Trajectory:
    """One rollout of N samples (T steps), recorded for the GRPO update.

    latents: [N, W + 1, C, h, w] fp32, x_s .. x_{s+W} with s = ``step_offset``: without an SDE window s = 0 and
        W = T (x_0 pure noise .. x_T the sample); with --sde_window_size only the window's latents are kept
        (what training reads). A transposed view of step-major storage (each step's [N, C, h, w] block
        contiguous): index it, or ``.reshape``, not ``.view``.
    log_probs: [N, T] fp32 log-prob of each recorded SDE transition, NaN for ODE steps outside the window (None
        for an ODE rollout); same layout note. Scalars per step, so kept full length.
    sigmas: [T + 1] fp32 on CPU, sigma of each latent (sigmas[T] == 0).
    prompts: N prompts (each unique prompt repeated G times, adjacent).
    final: [N, C, h, w] x_T when the window ends before T (None otherwise: x_T is ``latents[:, -1]``); the
        trainer releases it once decoded (``release_final``).
    means: [N, W, C, h, w] fp32 Gaussian mean of each recorded (window) transition, step ``step_offset + j`` at
        index j, kept only when the rollout was asked to (``record_means``: GRPO-Guard's mean_old); None otherwise.
    edit: the N rows' source conditioning when a prompt is an edit (rewards' sources, re-encoding in training);
        None for text-to-image. The DiT references it holds are also in ``conditioning``.
    """

    prompts: list[str]
    group_size: int
    conditioning: Conditioning
    latents: Tensor
    log_probs: Optional[Tensor]
    sigmas: Tensor
    settings: SamplerSettings
    step_offset: int = 0
    final: Optional[Tensor] = None
    means: Optional[Tensor] = None
    edit: Optional["EditConditioning"] = None

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        """T, the denoising steps of the rollout (recorded or not)."""
        return self.sigmas.shape[0] - 1

    @property
    def recorded_steps(self) -> range:
        """The steps whose transition (x, x_next) is kept: all T, or the SDE window."""
        return range(self.step_offset, self.step_offset + self.latents.shape[1] - 1)

    @property
    def final_latents(self) -> Tensor:
        """x_T [N, C, h, w], the latents to decode."""
        if self.final is not None:
            return self.final
        if self.recorded_steps.stop != self.num_steps:
            raise RuntimeError("x_T of this windowed trajectory was released after decoding.")
        return self.latents[:, -1]

    def release_final(self) -> None:
        """Drop x_T when it is held outside the window's slots (decoded already; training never reads it)."""
        self.final = None

    @property
    def group_ids(self) -> list[int]:
        """[N] the prompt (group) index of each sample: the G copies of a prompt are adjacent."""
        return [row // self.group_size for row in range(self.num_samples)]

    def per_sample(self, per_prompt: Sequence) -> list:
        """B per-prompt items -> N per-sample items (each repeated G times, in the samples' order)."""
        if len(per_prompt) * self.group_size != self.num_samples:
            raise ValueError(f"{len(per_prompt)} prompts x group size {self.group_size} != {self.num_samples} samples.")
        return [item for item in per_prompt for _ in range(self.group_size)]

    @property
    def sigma_max(self) -> float:
        """sigmas[1]: Flow-SDE's stand-in denominator where sigma == 1."""
        return float(self.sigmas[1])

    def sigma_pair(self, step: int) -> tuple[float, float]:
        """(sigma, sigma_next) of step ``step`` as python floats (exactly the values the rollout used)."""
        self._check_step(step)
        return float(self.sigmas[step]), float(self.sigmas[step + 1])

    def transition(self, step: int, rows: Rows = slice(None)) -> tuple[Tensor, Tensor]:
        """(x, x_next) of step ``step`` for ``rows``: two contiguous fp32 tensors [n, C, h, w]."""
        self._check_step(step)
        slot = step - self.step_offset
        x = self.latents[rows, slot].contiguous()
        x_next = self.latents[rows, slot + 1].contiguous()
        return x, x_next

    def _check_step(self, step: int) -> None:
        recorded = self.recorded_steps
        if step not in recorded:
            raise IndexError(f"step {step} is outside the recorded steps {recorded.start}..{recorded.stop - 1} of "
                             f"this {self.num_steps}-step trajectory.")


def split_rows(num_samples: int, micro_batch_size: Optional[int]) -> list[slice]:
    """Consecutive row slices of at most ``micro_batch_size`` (all rows in one slice when None)."""
    if micro_batch_size is not None and micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be a positive integer; got {micro_batch_size}.")
    size = num_samples if micro_batch_size is None else micro_batch_size
    return [slice(start, min(start + size, num_samples)) for start in range(0, num_samples, max(size, 1))]


def repeat_groups(tensor: Tensor, group_size: int) -> Tensor:
    """[B, ...] -> [B * G, ...], each row repeated G times in place (the G copies adjacent)."""
    return torch.repeat_interleave(tensor, group_size, dim=0)


__all__ = ["Conditioning", "Rows", "pick_rows", "SamplerSettings", "Trajectory", "repeat_groups", "split_rows"]

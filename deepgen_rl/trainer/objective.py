"""The losses of one training micro-step: a GRPO chunk (one drawn step x a chunk of samples) and SFT-aux.

GRPO chunk (docs/algorithms.md#policy-loss): recompute the log-prob of the RECORDED transition x_t -> x_{t+1} under the
current policy (same sampler arithmetic as the rollout, so the first chunk's ratio is 1), clipped-ratio loss,
plus beta x KL to the reference policy (v-based: velocities; x-based: step means), both masked to the samples
whose rewards were computed. SFT-aux: the flow-matching loss on an image-caption batch.

Legend: n samples in a chunk, N = B*G samples of the rank, C/h/w latent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from deepgen_rl.rl import (clip_band, clipped_policy_loss, flow_matching_loss, grpo_loss, masked_mean, noised_latents,
                           reference_kl)
from deepgen_rl.rl.flow_matching import flow_matching_objective
from deepgen_rl.rl.grpo_guard import dt_reweight, guard_log_ratio
from deepgen_rl.rl.losses import KLType
from deepgen_rl.sampling import Conditioning, Trajectory, recompute_step, step_coefficients, transition_mean
from deepgen_rl.sampling.noise import NoiseSource, SampleNoise
from deepgen_rl.sampling.trajectory import Rows

from .reference_policy import ReferencePolicy

if TYPE_CHECKING:
    from deepgen_rl.config import GRPOConfig


@dataclass(frozen=True)
class ObjectiveSettings:
    clip_range: float
    advantage_clip: float
    beta: float
    kl_type: KLType
    clip_band: Optional[tuple[float, float]] = None  # signed (low, high); None: (-clip_range, clip_range)
    algorithm: str = "grpo"  # --atrain_algorithm (grpo | grpoguard here; diffusionnft has its own objective)
    dt_reweight: bool = False  # --grpoguard_dt_reweight

    @classmethod
    def from_args(cls, args: GRPOConfig) -> "ObjectiveSettings":
        band = None
        if args.clip_range_low is not None or args.clip_range_high is not None:
            band = clip_band(args.clip_range, args.clip_range_low, args.clip_range_high)
        return cls(clip_range=args.clip_range, advantage_clip=args.advantage_clip, beta=args.beta,
                   kl_type=args.atrain_kl_type, clip_band=band, algorithm=args.atrain_algorithm,
                   dt_reweight=args.grpoguard_dt_reweight)


@dataclass(frozen=True)
class ChunkObjective:
    """loss: differentiable scalar (policy + beta KL, masked means over the chunk's valid samples); policy_term and
    kl_term: its two parts (kl_term = beta x masked mean KL, None without a KL), for schedules that step on each.
    The rest are detached floats for the logs; ratio_max_dev = max |ratio - 1| over the chunk's valid samples."""

    loss: Tensor
    policy_term: Tensor
    kl_term: Optional[Tensor]
    policy_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float
    ratio_max_dev: float
    num_valid: int


def policy_chunk_objective(model: torch.nn.Module, trajectory: Trajectory, step: int, rows: Rows, *,
                           advantages: Tensor, valid: Tensor, settings: ObjectiveSettings,
                           reference: Optional[ReferencePolicy], reference_conditioning: Optional[Conditioning],
                           conditioning: Optional[Conditioning] = None) -> ChunkObjective:
    """The GRPO loss of step ``step`` on the samples ``rows``.

    advantages: [N] fp32 and valid: [N] bool (on the model's device); ``conditioning``: N rows re-encoded with
    gradients when the text side trains (None: the rollout's recorded embeddings); ``reference_conditioning``:
    the reference's N rows (None: the recorded ones, i.e. the text side is frozen).
    """
    if conditioning is not None:
        trajectory = replace(trajectory, conditioning=conditioning)
    current = recompute_step(model, trajectory, step, rows)  # log_prob [n], velocity/mean [n, C, h, w]
    old_log_prob = trajectory.log_probs[rows, step]
    mask = valid[rows]
    if settings.algorithm == "grpoguard":  # ratio = exp(rho), rho the normalised log-ratio (rl/grpo_guard.py)
        log_prob = _guard_log_ratio(trajectory, step, rows, current.mean)
        old_log_prob = torch.zeros_like(log_prob)
    else:
        log_prob = current.log_prob
    policy = clipped_policy_loss(log_prob, old_log_prob, advantages[rows], clip_range=settings.clip_range,
                                 advantage_clip=settings.advantage_clip, mask=mask, band=settings.clip_band)
    if settings.dt_reweight:
        policy = replace(policy, loss=dt_reweight(policy.loss, *trajectory.sigma_pair(step)))
    kl = None
    if reference is not None and settings.beta > 0:
        kl = _reference_kl(trajectory, step, rows, current, reference, reference_conditioning, settings.kl_type)
    loss = grpo_loss(policy.loss, kl, settings.beta, mask)
    with torch.no_grad():
        deviation = (torch.exp(log_prob.float() - old_log_prob.float()) - 1.0).abs()
        deviation = deviation[mask].max() if bool(mask.any()) else deviation.new_zeros(())
        kl_value = float(masked_mean(kl.detach(), mask)) if kl is not None else 0.0
    kl_term = None if kl is None or settings.beta == 0 else settings.beta * masked_mean(kl, mask)
    return ChunkObjective(loss=loss, policy_term=policy.loss, kl_term=kl_term, policy_loss=float(policy.loss.detach()),
                          kl=kl_value,
                          clip_fraction=float(policy.clip_fraction), ratio_mean=float(policy.ratio_mean),
                          ratio_max_dev=float(deviation), num_valid=int(mask.sum()))


def _guard_log_ratio(trajectory: Trajectory, step: int, rows: Rows, mean: Tensor) -> Tensor:
    """[n] GRPO-Guard's rho of the chunk: eps recovered from the recorded x' and the rollout's step mean."""
    if trajectory.means is None:
        raise ValueError("--atrain_algorithm grpoguard needs the rollout's step means: roll out with "
                         "record_means=True (the trainer does so for grpoguard).")
    _, x_next = trajectory.transition(step, rows)
    sigma, sigma_next = trajectory.sigma_pair(step)
    settings = trajectory.settings
    coefs = step_coefficients(settings.sampler, sigma, sigma_next, eta=settings.eta, sigma_max=trajectory.sigma_max)
    mean_old = trajectory.means[rows, step - trajectory.step_offset].to(mean.device)
    return guard_log_ratio(mean, mean_old, x_next, coefs.noise_std)


def _reference_kl(trajectory: Trajectory, step: int, rows: Rows, current, reference: ReferencePolicy,
                  reference_conditioning: Optional[Conditioning], kl_type: str) -> Tensor:
    """[n] KL of the chunk to the reference policy, with the sampler std s_t of this step."""
    x, _ = trajectory.transition(step, rows)
    sigma, sigma_next = trajectory.sigma_pair(step)
    sigmas = trajectory.sigmas[step].to(x.device).expand(x.shape[0])
    cond = (reference_conditioning if reference_conditioning is not None else trajectory.conditioning).select(rows)
    v_ref = reference.velocity(x, sigmas, cond, trajectory.settings.cfg_scale)
    if kl_type == "v-based":
        return reference_kl("v-based", sampler_std=current.sampler_std, velocity=current.velocity, ref_velocity=v_ref)
    settings = trajectory.settings
    ref_mean = transition_mean(x, v_ref, sigma, sigma_next, sampler=settings.sampler, eta=settings.eta,
                               sigma_max=trajectory.sigma_max)
    return reference_kl("x-based", sampler_std=current.sampler_std, mean=current.mean, ref_mean=ref_mean)


def sftaux_objective(model: torch.nn.Module, images: Tensor, captions: list[str], generator: NoiseSource, *,
                     text_trains: bool) -> Tensor:
    """Flow-matching loss L_sft = mean ||v_theta(x_t, t, c) - (eps - x0)||^2, x_t = (1 - t) x0 + t eps,
    t ~ U(0, 1) (docs/algorithms.md#sft-aux). images: [n, 3, H, W] in [0, 1] on the model's device.
    ``generator``: one shared generator, or n per-item streams (``SampleNoise``; the trainer's, keyed by global
    item index): item i's VAE sample, eps and t then come from stream i alone, in that order."""
    if isinstance(generator, SampleNoise):
        # the VAE is frozen: no graph needed
        x0 = torch.cat([model.encode_images(images[i:i + 1], generator=g).float()
                        for i, g in enumerate(generator.generators)])
        noise = generator.randn(x0.shape[1:]).to(x0.device)
        t = generator.rand().to(x0.device)
    else:
        x0 = model.encode_images(images, generator=generator).float()  # the VAE is frozen: no graph needed
        noise = t = None
    with torch.set_grad_enabled(text_trains):
        prompt_embeds, pooled = model.encode_prompt(captions)
    if noise is None:
        return flow_matching_objective(model, x0, prompt_embeds, pooled, generator)
    velocity = model.predict_velocity(noised_latents(x0, noise, t), t, prompt_embeds, pooled).float()
    return flow_matching_loss(velocity, x0, noise)


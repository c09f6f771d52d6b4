"""GRPO objective pieces: clipped-ratio policy loss, KL to the reference policy, SFT-aux flow matching.

The convex SFT-aux mix (1 - lambda) L_grpo + lambda L_sft is applied by the trainer as per-backward weights.

Shape legend: M samples in a training micro-batch, C/h/w latent. Formulas: docs/algorithms.md#policy-loss,
#kl-penalty, #sft-aux.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

KLType = Literal["v-based", "x-based"]
KL_TYPES: tuple[str, ...] = get_args(KLType)
KL_EPS = 1e-7  # in the KL denominator 2 s_t^2 + eps, as the reference


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` [M] over ``mask`` [M] (bool; None = all). An empty mask gives 0 (still differentiable)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


@dataclass(frozen=True)
class PolicyLossResult:
    """loss: scalar (differentiable). clip_fraction: fraction of (valid) samples with the ratio outside the band.
    ratio_mean: mean ratio (detached). Both stats are detached scalars."""

    loss: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor


def clip_band(clip_range: float, low: Optional[float] = None, high: Optional[float] = None) -> tuple[float, float]:
    """The signed offsets (low, high) of the ratio band [1 + low, 1 + high]: (-c, c) from the symmetric
    ``--clip_range`` c, or ``--clip_range_low`` / ``--clip_range_high`` when given (Flow-Factory's tuple form)."""
    if low is None and high is None:
        return -clip_range, clip_range
    if low is None or high is None or not low <= 0.0 <= high:
        raise ValueError(f"--clip_range_low and --clip_range_high go together with low <= 0 <= high (the band "
                         f"[1 + low, 1 + high] holds ratio 1); got {low} and {high}.")
    return low, high


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float,
                        advantage_clip: float, mask: Optional[Tensor] = None,
                        band: Optional[tuple[float, float]] = None) -> PolicyLossResult:
    """PPO-clip surrogate (Flow-GRPO eq. 7 without the KL): ratio = exp(logp_new - logp_old),
    L = mean(max(-A ratio, -A clip(ratio, 1 + low, 1 + high))), A clipped to [-advantage_clip, advantage_clip];
    (low, high) = ``band`` or (-clip_range, clip_range).

    log_prob, old_log_prob, advantages: [M]; mask: [M] bool (invalid samples excluded) or None.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range (--clip_range) must be >= 0; got {clip_range}.")
    low, high = band if band is not None else (-clip_range, clip_range)
    adv = advantages.detach().float().clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_prob.float() - old_log_prob.detach().float())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 + low, 1.0 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        outside = ((ratio - 1.0 < low) | (ratio - 1.0 > high)).float()
        return PolicyLossResult(loss=loss, clip_fraction=masked_mean(outside, mask),
                                ratio_mean=masked_mean(ratio.detach(), mask))


def _scaled_msd(a: Tensor, b: Tensor, sampler_std: float) -> Tensor:
    dims = tuple(range(1, a.ndim))
    msd = (a.float() - b.float()).square().mean(dim=dims)  # [M]
    return msd / (2 * sampler_std * sampler_std + KL_EPS)


def kl_v_based(velocity: Tensor, ref_velocity: Tensor, sampler_std: float) -> Tensor:
    """v-based KL (the reference default): mean over dims of (v_theta - v_ref)^2 / (2 s_t^2 + 1e-7).

    velocity, ref_velocity: [M, C, h, w]; sampler_std: s_t of the step (one drawn step per chunk) -> [M].
    """
    return _scaled_msd(velocity, ref_velocity, sampler_std)


def kl_x_based(mean: Tensor, ref_mean: Tensor, sampler_std: float) -> Tensor:
    """x-based KL: mean over dims of (mean_theta - mean_ref)^2 / (2 s_t^2 + 1e-7), the step means of the two
    policies (for the same noise std this is the Gaussian KL up to the dimension average).

    mean, ref_mean: [M, C, h, w]; sampler_std: s_t -> [M].
    """
    return _scaled_msd(mean, ref_mean, sampler_std)


def reference_kl(kl_type: KLType, *, sampler_std: float, velocity: Optional[Tensor] = None,
                 ref_velocity: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                 ref_mean: Optional[Tensor] = None) -> Tensor:
    """Dispatch on ``--atrain_kl_type``: v-based needs the velocities, x-based the step means. -> [M]."""
    if kl_type == "v-based":
        if velocity is None or ref_velocity is None:
            raise ValueError("--atrain_kl_type v-based needs velocity and ref_velocity.")
        return kl_v_based(velocity, ref_velocity, sampler_std)
    if kl_type == "x-based":
        if mean is None or ref_mean is None:
            raise ValueError("--atrain_kl_type x-based needs mean and ref_mean (the step means).")
        return kl_x_based(mean, ref_mean, sampler_std)
    raise ValueError(f"--atrain_kl_type must be one of {', '.join(KL_TYPES)}; got {kl_type!r}.")


def grpo_loss(policy_loss: Tensor, kl: Optional[Tensor], beta: float, mask: Optional[Tensor] = None) -> Tensor:
    """L_grpo = policy loss + beta * mean KL (kl: [M] per-sample, or None when beta == 0)."""
    if kl is None or beta == 0:
        return policy_loss
    return policy_loss + beta * masked_mean(kl, mask)


def noised_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Flow-matching interpolation x_t = (1 - t) x0 + t eps. x0, noise: [M, C, h, w]; t: [M] in [0, 1]."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def flow_matching_loss(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """SFT-aux loss: mean over all elements of (v_theta(x_t, t, c) - (eps - x0))^2. All [M, C, h, w] -> scalar."""
    return (velocity.float() - (noise.float() - x0.float())).square().mean()


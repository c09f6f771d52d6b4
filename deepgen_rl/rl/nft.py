"""DiffusionNFT (arXiv 2509.16117) loss math, with the semantics of the official NVlabs implementation.

One training sample: the rollout's final clean latent x0, a FRESH forward noising x_t = (1 - t) x0 + t eps at a
per-sample random t, the current velocity v = v_theta(x_t) and the old policy's v_old (no gradient). With beta =
``--nft_beta`` and C = ``--nft_adv_clip``:

    A~ = clamp(A, -C, C),   r = clamp(A~ / (2 C) + 1/2, 0, 1)                         (optimality probability)
    v+ = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v                  (implicit policies)
    x+ = x_t - t v+,   x- = x_t - t v-                                                 (their x0 predictions)
    w+- = max(mean_CHW |x+- - x0|, 1e-5)   (float64, detached: the adaptive weights)
    P = mean_CHW (x+ - x0)^2 / w+,   N = mean_CHW (x- - x0)^2 / w-
    L = C (r P + (1 - r) N) / beta          per sample; the batch mean is taken by the caller (masked)

KL to the reference policy, official weighting: plain mean_CHW (v - v_ref)^2 (no 1 / (2 s_t^2): the NFT step has
no sampler std), times ``--beta``.

The old policy is a separate copy updated after each GRPO step, old <- delta old + (1 - delta) theta, with the
official schedule of delta in the optimizer steps taken so far (:func:`old_policy_decay`).

Shape legend: n samples, C/h/w latent, D = C*h*w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

NftDecayType = Literal[0, 1, 2]
NFT_DECAY_TYPES: tuple[int, ...] = get_args(NftDecayType)
WEIGHT_FLOOR = 1e-5  # the official floor of the adaptive weights

# decay_type -> (flat steps, rate per step, cap): the official schedules (0: old = theta after every step;
# 1: the default configs; 2: the OCR config).
_DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, decay_type: int) -> float:
    """delta(step) of old <- delta old + (1 - delta) theta: 0 before ``flat`` steps, then min((step - flat) * rate,
    cap). ``step``: optimizer steps taken so far. Type 1: min(0.001 s, 0.5); type 2: 0 for s < 75, then
    min(0.0075 (s - 75), 0.999); type 0: always 0."""
    if decay_type not in _DECAY_SCHEDULES:
        raise ValueError(f"--nft_decay_type must be one of {', '.join(map(str, NFT_DECAY_TYPES))}; got {decay_type}.")
    flat, rate, cap = _DECAY_SCHEDULES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clamp(clamp(A, -C, C) / (2 C) + 1/2, 0, 1). advantages: [n] -> [n] fp32 (detached)."""
    clipped = advantages.detach().float().clamp(-adv_clip, adv_clip)
    return (clipped / (2.0 * adv_clip) + 0.5).clamp(0.0, 1.0)


def _broadcast(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _weighted_sq_error(pred: Tensor, x0: Tensor) -> Tensor:
    """mean_CHW (pred - x0)^2 / w with w = max(mean_CHW |pred - x0|, 1e-5) computed in float64 without gradient."""
    dims = tuple(range(1, pred.ndim))
    with torch.no_grad():
        weight = (pred.detach().double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(WEIGHT_FLOOR)
    return ((pred - x0) ** 2 / weight.to(pred.dtype)).mean(dim=dims)


@dataclass(frozen=True)
class NftLoss:
    """loss: [n] per-sample C (r P + (1 - r) N) / beta (differentiable in v); positive / negative: [n] P and N;
    optimality: [n] r (all but ``loss`` detached)."""

    loss: Tensor
    positive: Tensor
    negative: Tensor
    optimality: Tensor


def nft_loss(velocity: Tensor, old_velocity: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, advantages: Tensor, *,
             beta: float, adv_clip: float) -> NftLoss:
    """The DiffusionNFT policy loss per sample (module docstring).

    velocity: [n, C, h, w] v_theta(x_t) (differentiable); old_velocity: [n, C, h, w] v_old(x_t) (detached here);
    x_t, x0: [n, C, h, w]; t: [n] the noising times; advantages: [n]. beta > 0, adv_clip > 0.
    """
    if beta <= 0 or adv_clip <= 0:
        raise ValueError(f"--nft_beta and --nft_adv_clip must be > 0; got {beta} and {adv_clip}.")
    v = velocity.float()
    v_old = old_velocity.detach().float()
    x_t, x0 = x_t.detach().float(), x0.detach().float()
    t = _broadcast(t.detach().float(), v)
    r = optimality(advantages, adv_clip).to(v.device)
    positive_pred = x_t - t * (beta * v + (1.0 - beta) * v_old)
    negative_pred = x_t - t * ((1.0 + beta) * v_old - beta * v)
    positive = _weighted_sq_error(positive_pred, x0)
    negative = _weighted_sq_error(negative_pred, x0)
    loss = adv_clip * (r * positive + (1.0 - r) * negative) / beta
    return NftLoss(loss=loss, positive=positive.detach(), negative=negative.detach(), optimality=r)


def nft_kl(velocity: Tensor, ref_velocity: Tensor) -> Tensor:
    """The official KL term: mean_CHW (v - v_ref)^2 per sample. [n, C, h, w] x 2 -> [n] (weighted by --beta)."""
    dims = tuple(range(1, velocity.ndim))
    return (velocity.float() - ref_velocity.detach().float()).square().mean(dim=dims)


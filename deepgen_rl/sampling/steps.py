"""One denoising step of the flow-matching samplers, with the log-prob of the transition.

Convention (docs/algorithms.md#conventions): x_t = (1 - s) x0 + s eps, the model predicts v = eps - x0, s = sigma in
[0, 1].
A step goes from sigma ``s`` to ``s' < s``; x0_hat = x - s v, eps_hat = x + (1 - s) v, dt = s' - s < 0.

Every sampler here is a Gaussian transition whose mean is LINEAR in (x, v):

    mean = coef_x * x + coef_v * v,        x' = mean + noise_std * z,  z ~ N(0, I)

so :func:`step_coefficients` computes the four scalars (coef_x, coef_v, noise_std, sampler_std) once per step
(in float64 from the sigmas) and the tensor work is a handful of element-wise ops in fp32. Functions are pure:
sigmas are explicit arguments (never read from scheduler state), noise comes from an explicit generator or tensor.

Sigmas are python floats: one step index is shared by the batch (rollout and training alike), so recomputing a
step reproduces the recorded log-probs bit for bit.

Shape legend: N samples (B prompts x G group), C/h/w latent channels/height/width. ``x``, ``v``: [N, C, h, w].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

Sampler = Literal["ode", "flow_sde", "cps_sde", "dance_sde"]
LogProbVariant = Literal["reference", "exact"]

SAMPLERS: tuple[str, ...] = get_args(Sampler)
LOGPROB_VARIANTS: tuple[str, ...] = get_args(LogProbVariant)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one Gaussian step: mean = coef_x * x + coef_v * v, x' = mean + noise_std * z.

    Each field is a python float. ``sampler_std`` is the paper's s_t (Flow-SDE: a = eta sqrt(s / (1 - s)); CPS:
    s' sin(eta pi / 2)); it is the std the KL terms divide by. ``noise_std`` is the actual std of x' given x
    (Flow-SDE: a sqrt(-dt); CPS: s_t). Dance-SDE: both are eta sqrt(-dt), as the reference returns it.
    """

    coef_x: float
    coef_v: float
    noise_std: float
    sampler_std: float


@dataclass(frozen=True)
class StepResult:
    """Outcome of one sampled step.

    next_latents: [N, C, h, w] fp32, x'.
    mean: [N, C, h, w] fp32, the Gaussian mean of x' given x (equals ``next_latents`` for the ODE).
    sampler_std: s_t; 0 for the ODE.
    noise_std: std of x' given x; 0 for the ODE.
    log_prob: [N] fp32 log-prob of the transition (mean over latent dims); None for the ODE.
    """

    next_latents: Tensor
    mean: Tensor
    sampler_std: float
    noise_std: float
    log_prob: Optional[Tensor]


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")


def _check_variant(variant: str) -> None:
    if variant not in LOGPROB_VARIANTS:
        raise ValueError(f"logprob_variant must be one of {', '.join(LOGPROB_VARIANTS)}; got {variant!r}.")


def _flow_sde_coefficients(s: float, s_next: float, eta: float, sigma_max: Optional[float]) -> StepCoefficients:
    """Flow-GRPO SDE (arXiv 2505.05470, eq. 9-10): a = eta sqrt(s / (1 - s)); at s == 1 the denominator uses sigma_max
    (= sigmas[1], the reference's choice) to stay finite.

    mean = x (1 + a^2 dt / (2 s)) + v (1 + a^2 (1 - s) / (2 s)) dt, noise std a sqrt(-dt).
    """
    dt = s_next - s
    if s >= 1 and sigma_max is None:
        raise ValueError("flow_sde needs sigma_max (= sigmas[1]) when a step starts at sigma == 1.")
    denom_sigma = float(sigma_max) if s >= 1 else s
    a = eta * math.sqrt(s / (1 - denom_sigma))
    coef_x = 1 + a * a * dt / (2 * s)
    coef_v = (1 + a * a * (1 - s) / (2 * s)) * dt
    return StepCoefficients(coef_x=coef_x, coef_v=coef_v, noise_std=a * math.sqrt(-dt), sampler_std=a)


def _cps_coefficients(s: float, s_next: float, eta: float) -> StepCoefficients:
    """Coefficients-preserving sampling (arXiv 2509.05952, eq. 11): s_t = s' sin(eta pi / 2),
    mean = (1 - s') x0_hat + sqrt(s'^2 - s_t^2) eps_hat, noise std s_t.

    Expanding x0_hat = x - s v and eps_hat = x + (1 - s) v gives mean = (1 - s' + c) x + (c (1 - s) - s (1 - s')) v
    with c = sqrt(s'^2 - s_t^2) = s' cos(eta pi / 2).
    """
    s_t = s_next * math.sin(eta * math.pi / 2)
    c = math.sqrt(s_next * s_next - s_t * s_t)
    coef_x = (1 - s_next) + c
    coef_v = c * (1 - s) - s * (1 - s_next)
    return StepCoefficients(coef_x=coef_x, coef_v=coef_v, noise_std=s_t, sampler_std=s_t)


def _dance_sde_coefficients(s: float, s_next: float, eta: float) -> StepCoefficients:
    """Dance-SDE (DanceGRPO, arXiv 2505.07818; the reference's step): with x0_hat = x - s v,

        mean = x + (v + (eta^2 / 2) (x - (1 - s) x0_hat) / (s^2 + 1e-8)) dt,   noise std eta sqrt(-dt).

    x - (1 - s) x0_hat = s x + s (1 - s) v, so mean = (1 + k s dt) x + (1 + k s (1 - s)) dt v with
    k = eta^2 / (2 (s^2 + 1e-8)). The reference also returns eta sqrt(-dt) as the sampler std (the KL's s_t).
    """
    dt = s_next - s
    k = eta * eta / (2 * (s * s + 1e-8))
    noise = eta * math.sqrt(-dt)
    return StepCoefficients(coef_x=1 + k * s * dt, coef_v=(1 + k * s * (1 - s)) * dt, noise_std=noise,
                            sampler_std=noise)


def step_coefficients(
    sampler: Sampler, sigma: float, sigma_next: float, *, eta: float, sigma_max: Optional[float],
) -> StepCoefficients:
    """The scalars of one step from ``sigma`` to ``sigma_next`` (python floats, computed in float64).

    ``eta``: noise level (ignored by the ODE); ``sigma_max``: sigmas[1], used by flow_sde where sigma == 1.
    """
    _check_sampler(sampler)
    s, s_next = float(sigma), float(sigma_next)
    if sampler == "ode":  # Euler: x' = x + dt v
        return StepCoefficients(coef_x=1.0, coef_v=s_next - s, noise_std=0.0, sampler_std=0.0)
    if sampler == "flow_sde":
        return _flow_sde_coefficients(s, s_next, eta, sigma_max)
    if sampler == "dance_sde":
        return _dance_sde_coefficients(s, s_next, eta)
    return _cps_coefficients(s, s_next, eta)


# ----------------------------------------------------------------------------------------------------------------
# Tensor math.


def step_mean(x: Tensor, v: Tensor, coefs: StepCoefficients) -> Tensor:
    """Gaussian mean of x' given x: coef_x * x + coef_v * v. x, v: [N, C, h, w] (cast to fp32) -> [N, C, h, w] fp32.

    One fused multiply-add, the same in rollout and recompute (so their log-probs agree bit for bit).
    """
    return (x.float() * coefs.coef_x).add_(v.float(), alpha=coefs.coef_v)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, noise_std: float, variant: LogProbVariant) -> Tensor:
    """Log-prob of x' under N(mean, noise_std^2 I), averaged over the latent dims. x_next, mean: [N, ...] -> [N].

    ``reference``: -mean((x' - mean)^2), constants and the 1 / (2 s_t^2) factor dropped (the CPS reference; the
    guide's clip_range 1e-4 was tuned on this scale). ``exact``: the Gaussian log-density. A step with noise std 0
    (the last CPS step, eta = 0) is deterministic: its exact log-prob is reported as 0 (it is never trained).
    """
    _check_variant(variant)
    dims = tuple(range(1, x_next.ndim))
    msd = torch.sub(x_next.float(), mean).square_().mean(dim=dims)  # [N]
    if variant == "reference":
        return msd.neg_()
    if noise_std <= 0:
        return torch.zeros_like(msd)
    return -msd / (2 * noise_std * noise_std) - math.log(noise_std) - _HALF_LOG_2PI


def _draw_noise(like: Tensor, generator: Optional[torch.Generator], noise: Optional[Tensor]) -> Tensor:
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; the latents have {tuple(like.shape)}.")
        return noise.to(device=like.device, dtype=torch.float32)
    device = generator.device if generator is not None else like.device
    z = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return z if z.device == like.device else z.to(like.device, non_blocking=True)


def sample_with_coefficients(
    x: Tensor, v: Tensor, coefs: StepCoefficients, variant: LogProbVariant,
    generator: Optional[torch.Generator], noise: Optional[Tensor], out: Optional[Tensor] = None,
) -> StepResult:
    """Draw x' = mean + noise_std * z for precomputed coefficients (the rollout loop precomputes them once).

    x, v: [N, C, h, w]; ``variant`` must already be the effective one (see :func:`effective_logprob_variant`);
    ``out``: optional contiguous [N, C, h, w] fp32 buffer that receives x' (the rollout's trajectory slot).
    """
    mean = step_mean(x, v, coefs)
    z = _draw_noise(mean, generator, noise)
    next_latents = torch.add(mean, z, alpha=coefs.noise_std, out=out)
    return StepResult(
        next_latents=next_latents, mean=mean, sampler_std=coefs.sampler_std, noise_std=coefs.noise_std,
        log_prob=gaussian_log_prob(next_latents, mean, coefs.noise_std, variant),
    )


def effective_logprob_variant(sampler: Sampler, logprob_variant: LogProbVariant) -> LogProbVariant:
    """Flow-SDE and Dance-SDE always use the exact Gaussian (as their papers); the variant flag only concerns CPS."""
    return "exact" if sampler in ("flow_sde", "dance_sde") else logprob_variant


def transition_mean(
    x: Tensor, v: Tensor, sigma: float, sigma_next: float, *, sampler: Sampler, eta: float,
    sigma_max: Optional[float],
) -> Tensor:
    """Gaussian mean of the step under model output v (used by the x-based KL). x, v: [N, C, h, w] -> same."""
    coefs = step_coefficients(sampler, sigma, sigma_next, eta=eta, sigma_max=sigma_max)
    return step_mean(x, v, coefs)

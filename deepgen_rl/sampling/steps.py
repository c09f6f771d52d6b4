"""One denoising step of the flow-matching samplers, with the log-prob of the transition.

Convention (DESIGN.md section 4): x_t = (1 - s) x0 + s eps, the model predicts v = eps - x0, s = sigma in [0, 1].
A step goes from sigma ``s`` to ``s' < s``; x0_hat = x - s v, eps_hat = x + (1 - s) v, dt = s' - s < 0.

Every sampler here is a Gaussian transition whose mean is LINEAR in (x, v):

    mean = coef_x * x + coef_v * v,        x' = mean + noise_std * z,  z ~ N(0, I)

so :func:`step_coefficients` computes the four scalars (coef_x, coef_v, noise_std, sampler_std) once per step
(in float64 from the sigmas) and the tensor work is a handful of element-wise ops in fp32. Functions are pure:
sigmas are explicit arguments (never read from scheduler state), noise comes from an explicit generator or tensor.

Sigmas may be python floats (the usual case: one step index shared by the batch, and the rollout's path) or
tensors [N] (one per sample); the two agree to fp32 rounding. Recomputing with floats, as the rollout did,
reproduces the recorded log-probs bit for bit.

Shape legend: N samples (B prompts x G group), C/h/w latent channels/height/width. ``x``, ``v``: [N, C, h, w].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

Sampler = Literal["ode", "flow_sde", "cps_sde", "dance_sde"]
LogProbVariant = Literal["reference", "exact"]
SigmaLike = Union[float, Tensor]

SAMPLERS = ("ode", "flow_sde", "cps_sde", "dance_sde")
LOGPROB_VARIANTS = ("reference", "exact")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one Gaussian step: mean = coef_x * x + coef_v * v, x' = mean + noise_std * z.

    Each field is a python float, or a float64 tensor [N, 1, 1, 1] when the sigmas were tensors.
    ``sampler_std`` is the paper's s_t (Flow-SDE: a = eta sqrt(s / (1 - s)); CPS: s' sin(eta pi / 2)); it is the
    std the KL terms divide by. ``noise_std`` is the actual std of x' given x (Flow-SDE: a sqrt(-dt); CPS: s_t).
    Dance-SDE: both are eta sqrt(-dt), as the reference returns it.
    """

    coef_x: SigmaLike
    coef_v: SigmaLike
    noise_std: SigmaLike
    sampler_std: SigmaLike


@dataclass(frozen=True)
class StepResult:
    """Outcome of one sampled step.

    next_latents: [N, C, h, w] fp32, x'.
    mean: [N, C, h, w] fp32, the Gaussian mean of x' given x (equals ``next_latents`` for the ODE).
    sampler_std: s_t (float, or tensor [N, 1, 1, 1]); 0 for the ODE.
    noise_std: std of x' given x (float or tensor [N, 1, 1, 1]); 0 for the ODE.
    log_prob: [N] fp32 log-prob of the transition (mean over latent dims); None for the ODE.
    """

    next_latents: Tensor
    mean: Tensor
    sampler_std: SigmaLike
    noise_std: SigmaLike
    log_prob: Optional[Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers: the same formulas for python floats and float64 tensors.


def _as_f64(sigma: SigmaLike, ndim: int) -> SigmaLike:
    """Python float stays a float; a tensor [N] (or 0-d) becomes float64 [N, 1, ..., 1] to broadcast over ``ndim``."""
    if isinstance(sigma, Tensor):
        sigma = sigma.to(torch.float64)
        return sigma.reshape(-1, *([1] * (ndim - 1))) if sigma.ndim else sigma
    return float(sigma)


def _sqrt(value: SigmaLike) -> SigmaLike:
    return torch.sqrt(value) if isinstance(value, Tensor) else math.sqrt(value)


def _to_fp32(value: SigmaLike) -> SigmaLike:
    return value.to(torch.float32) if isinstance(value, Tensor) else value


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")


def _check_variant(variant: str) -> None:
    if variant not in LOGPROB_VARIANTS:
        raise ValueError(f"logprob_variant must be one of {', '.join(LOGPROB_VARIANTS)}; got {variant!r}.")


def _flow_sde_coefficients(
    s: SigmaLike, s_next: SigmaLike, eta: float, sigma_max: Optional[SigmaLike]
) -> StepCoefficients:
    """Flow-GRPO SDE (arXiv 2505.05470, eq. 9-10): a = eta sqrt(s / (1 - s)); at s == 1 the denominator uses sigma_max
    (= sigmas[1], the reference's choice) to stay finite.

    mean = x (1 + a^2 dt / (2 s)) + v (1 + a^2 (1 - s) / (2 s)) dt, noise std a sqrt(-dt).
    """
    dt = s_next - s
    if isinstance(s, Tensor):
        if bool((s >= 1).any()) and sigma_max is None:
            raise ValueError("flow_sde needs sigma_max (= sigmas[1]) when a step starts at sigma == 1.")
        denom_sigma = torch.where(s >= 1, torch.as_tensor(sigma_max if sigma_max is not None else 0.0,
                                                          dtype=torch.float64, device=s.device), s)
    else:
        if s >= 1 and sigma_max is None:
            raise ValueError("flow_sde needs sigma_max (= sigmas[1]) when a step starts at sigma == 1.")
        denom_sigma = float(sigma_max) if s >= 1 else s
    a = eta * _sqrt(s / (1 - denom_sigma))
    coef_x = 1 + a * a * dt / (2 * s)
    coef_v = (1 + a * a * (1 - s) / (2 * s)) * dt
    return StepCoefficients(coef_x=coef_x, coef_v=coef_v, noise_std=a * _sqrt(-dt), sampler_std=a)


def _cps_coefficients(s: SigmaLike, s_next: SigmaLike, eta: float) -> StepCoefficients:
    """Coefficients-preserving sampling (arXiv 2509.05952, eq. 11): s_t = s' sin(eta pi / 2),
    mean = (1 - s') x0_hat + sqrt(s'^2 - s_t^2) eps_hat, noise std s_t.

    Expanding x0_hat = x - s v and eps_hat = x + (1 - s) v gives mean = (1 - s' + c) x + (c (1 - s) - s (1 - s')) v
    with c = sqrt(s'^2 - s_t^2) = s' cos(eta pi / 2).
    """
    s_t = s_next * math.sin(eta * math.pi / 2)
    c = _sqrt(s_next * s_next - s_t * s_t)
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
    sampler: Sampler, sigma: SigmaLike, sigma_next: SigmaLike, *, eta: float, sigma_max: Optional[SigmaLike],
    ndim: int = 4,
) -> StepCoefficients:
    """The scalars of one step from ``sigma`` to ``sigma_next`` (float, or tensor [N]); ``ndim`` of the latents.

    ``eta``: noise level (ignored by the ODE); ``sigma_max``: sigmas[1], used by flow_sde where sigma == 1.
    """
    _check_sampler(sampler)
    s, s_next = _as_f64(sigma, ndim), _as_f64(sigma_next, ndim)
    if sampler == "ode":  # Euler: x' = x + dt v
        return StepCoefficients(coef_x=1.0, coef_v=s_next - s, noise_std=0.0, sampler_std=0.0)
    if sampler == "flow_sde":
        return _flow_sde_coefficients(s, s_next, eta, _as_f64(sigma_max, ndim) if sigma_max is not None else None)
    if sampler == "dance_sde":
        if isinstance(s, Tensor) or isinstance(s_next, Tensor):
            raise ValueError("dance_sde takes python-float sigmas (one step index shared by the batch).")
        return _dance_sde_coefficients(s, s_next, eta)
    return _cps_coefficients(s, s_next, eta)


# ----------------------------------------------------------------------------------------------------------------
# Tensor math.


def step_mean(x: Tensor, v: Tensor, coefs: StepCoefficients) -> Tensor:
    """Gaussian mean of x' given x: coef_x * x + coef_v * v. x, v: [N, C, h, w] (cast to fp32) -> [N, C, h, w] fp32.

    Float coefficients use one fused multiply-add (the rollout's path); tensor coefficients ([N, 1, 1, 1]) agree
    with it to fp32 rounding, not bit for bit, so recompute with the same kind of sigmas the rollout used (floats).
    """
    if isinstance(coefs.coef_v, Tensor) or isinstance(coefs.coef_x, Tensor):
        return x.float() * _to_fp32(coefs.coef_x) + v.float() * _to_fp32(coefs.coef_v)
    return (x.float() * coefs.coef_x).add_(v.float(), alpha=coefs.coef_v)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, noise_std: SigmaLike, variant: LogProbVariant) -> Tensor:
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
    if isinstance(noise_std, Tensor):
        std = noise_std.to(torch.float32).reshape(-1)
        std = std.expand_as(msd) if std.numel() == 1 else std
        safe = torch.where(std > 0, std, torch.ones_like(std))
        exact = -msd / (2 * safe * safe) - torch.log(safe) - _HALF_LOG_2PI
        return torch.where(std > 0, exact, torch.zeros_like(exact))
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
    if isinstance(coefs.noise_std, Tensor):
        next_latents = torch.add(mean, z * _to_fp32(coefs.noise_std), out=out)
    else:
        next_latents = torch.add(mean, z, alpha=coefs.noise_std, out=out)
    return StepResult(
        next_latents=next_latents, mean=mean, sampler_std=coefs.sampler_std, noise_std=coefs.noise_std,
        log_prob=gaussian_log_prob(next_latents, mean, coefs.noise_std, variant),
    )


def ode_step(x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> StepResult:
    """Euler step x' = x + (s' - s) v. x, v: [N, C, h, w] -> StepResult (log_prob None)."""
    coefs = step_coefficients("ode", sigma, sigma_next, eta=0.0, sigma_max=None, ndim=x.ndim)
    mean = step_mean(x, v, coefs)
    return StepResult(next_latents=mean, mean=mean, sampler_std=0.0, noise_std=0.0, log_prob=None)


def flow_sde_step(
    x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *, eta: float, sigma_max: Optional[SigmaLike],
    generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
) -> StepResult:
    """Flow-GRPO SDE step (always the exact Gaussian log-prob). x, v: [N, C, h, w]; sigma_max = sigmas[1].

    Noise: ``noise`` [N, C, h, w] if given, else drawn from ``generator``.
    """
    coefs = step_coefficients("flow_sde", sigma, sigma_next, eta=eta, sigma_max=sigma_max, ndim=x.ndim)
    return sample_with_coefficients(x, v, coefs, "exact", generator, noise)


def cps_sde_step(
    x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *, eta: float, logprob_variant: LogProbVariant,
    generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
) -> StepResult:
    """CPS-SDE step; log-prob ``reference`` (-mean (x' - mean)^2) or ``exact``. x, v: [N, C, h, w]."""
    coefs = step_coefficients("cps_sde", sigma, sigma_next, eta=eta, sigma_max=None, ndim=x.ndim)
    return sample_with_coefficients(x, v, coefs, logprob_variant, generator, noise)


def dance_sde_step(
    x: Tensor, v: Tensor, sigma: float, sigma_next: float, *, eta: float,
    generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
) -> StepResult:
    """Dance-SDE step (always the exact Gaussian log-prob, averaged over latent dims). x, v: [N, C, h, w].

    The reference adds 1e-8 to the variance and to the std inside its log; the exact density here differs from it
    by a relative ~1e-8 / (eta^2 |dt|), far below any clip range.
    """
    coefs = step_coefficients("dance_sde", sigma, sigma_next, eta=eta, sigma_max=None, ndim=x.ndim)
    return sample_with_coefficients(x, v, coefs, "exact", generator, noise)


def sampler_step(
    sampler: Sampler, x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *, eta: float,
    sigma_max: Optional[SigmaLike], logprob_variant: LogProbVariant,
    generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
) -> StepResult:
    """Dispatch to :func:`ode_step`, :func:`flow_sde_step`, :func:`cps_sde_step` or :func:`dance_sde_step`."""
    _check_sampler(sampler)
    if sampler == "ode":
        return ode_step(x, v, sigma, sigma_next)
    if sampler == "dance_sde":
        return dance_sde_step(x, v, sigma, sigma_next, eta=eta, generator=generator, noise=noise)
    if sampler == "flow_sde":
        return flow_sde_step(x, v, sigma, sigma_next, eta=eta, sigma_max=sigma_max, generator=generator, noise=noise)
    return cps_sde_step(x, v, sigma, sigma_next, eta=eta, logprob_variant=logprob_variant, generator=generator,
                        noise=noise)


def effective_logprob_variant(sampler: Sampler, logprob_variant: LogProbVariant) -> LogProbVariant:
    """Flow-SDE and Dance-SDE always use the exact Gaussian (as their papers); the variant flag only concerns CPS."""
    return "exact" if sampler in ("flow_sde", "dance_sde") else logprob_variant


def transition_mean(
    x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *, sampler: Sampler, eta: float,
    sigma_max: Optional[SigmaLike],
) -> Tensor:
    """Gaussian mean of the step under model output v (used by the x-based KL). x, v: [N, C, h, w] -> same."""
    coefs = step_coefficients(sampler, sigma, sigma_next, eta=eta, sigma_max=sigma_max, ndim=x.ndim)
    return step_mean(x, v, coefs)


def transition_log_prob(
    x: Tensor, x_next: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *, sampler: Sampler, eta: float,
    sigma_max: Optional[SigmaLike], logprob_variant: LogProbVariant,
) -> Tensor:
    """Log-prob [N] of a GIVEN transition x -> x_next under model output v (training recomputes with it).

    x, x_next, v: [N, C, h, w]. Same arithmetic as the sampling step, so on the same v it returns the recorded
    log-prob bit for bit. The ODE has no density: asking for it is an error.
    """
    if sampler == "ode":
        raise ValueError("sampler 'ode' is deterministic and has no transition log-prob; use cps_sde, flow_sde or "
                         "dance_sde.")
    coefs = step_coefficients(sampler, sigma, sigma_next, eta=eta, sigma_max=sigma_max, ndim=x.ndim)
    mean = step_mean(x, v, coefs)
    return gaussian_log_prob(x_next, mean, coefs.noise_std, effective_logprob_variant(sampler, logprob_variant))


def sampler_std_schedule(sampler: Sampler, sigmas: Tensor, *, eta: float) -> Tensor:
    """s_t of every step: sigmas [T + 1] -> [T] fp32 (flow_sde: a, with sigmas[1] where sigma == 1; cps: s' sin;
    dance_sde: eta sqrt(-dt))."""
    values = []
    sig = sigmas.detach().to(torch.float64).cpu().tolist()
    for i in range(len(sig) - 1):
        coefs = step_coefficients(sampler, sig[i], sig[i + 1], eta=eta, sigma_max=sig[1] if len(sig) > 1 else None)
        values.append(float(coefs.sampler_std))
    return torch.tensor(values, dtype=torch.float32)

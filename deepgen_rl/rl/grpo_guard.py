"""GRPO-Guard (arXiv 2510.22319): the normalised log-ratio (RatioNorm) and the |dt| gradient reweighting.

Every sampler we have is a Gaussian step x' = mean_old + noise_std * eps (sampling/steps.py). The paper writes its
RatioNorm for the Flow-SDE sampler, whose log-prob is the exact Gaussian density with s = sigma_t sqrt(-dt) (the
noise std):

    Delta = log p_theta(x') - log p_old(x') = mean_CHW(eps * (mean_theta - mean_old)) / s - mse / (2 s^2),
    rho   = (Delta + mse / (2 s^2)) * s  =  mean_CHW(eps * (mean_theta - mean_old))           (mse = mean_CHW dmu^2)

so the paper's normalised log-ratio is the sampler-independent quantity mean_CHW(eps * (mean_theta - mean_old)) (its
scale s cancels the 1/s of Delta: the factor left is 1). We compute that quantity directly, from the rollout's own
step mean and the recorded x' (eps = (x' - mean_old) / noise_std), so it holds whatever log-prob each sampler uses:
the exact Gaussian (Flow-SDE, Dance-SDE, CPS ``exact``) or the reference's CPS ``-mean((x' - mean)^2)``, for which
rho = (Delta + mse) / (2 noise_std). The reference instead applies the Flow-SDE form to every sampler, which leaves a
positive, mean-shift-driven bias with CPS-SDE and Dance-SDE (docs/algorithms.md#grpo-guard).

Gradient reweighting (the paper's second component, optional): the policy loss of a step is divided by |dt|
(= (sqrt(-dt))^2), which evens out the gradient sizes over the denoising steps.

Shape legend: n samples, C/h/w latent.
"""

from __future__ import annotations

from torch import Tensor


def guard_log_ratio(mean: Tensor, old_mean: Tensor, next_latents: Tensor, noise_std: float) -> Tensor:
    """rho = mean_CHW(eps * (mean - old_mean)) with eps = (x' - old_mean) / noise_std, the recorded step's noise.

    mean: [n, C, h, w] step mean under the current policy (differentiable); old_mean: [n, C, h, w] the rollout's
    step mean; next_latents: [n, C, h, w] the recorded x'; noise_std > 0 (trained steps never land on sigma = 0).
    Returns [n] fp32. At the rollout's weights mean == old_mean, so rho is exactly 0 (ratio exactly 1).
    """
    if noise_std <= 0:
        raise ValueError(f"GRPO-Guard needs a stochastic step (noise std > 0); got {noise_std}.")
    old = old_mean.detach().float()
    eps = (next_latents.detach().float() - old) / noise_std
    dims = tuple(range(1, mean.ndim))
    return (eps * (mean.float() - old)).mean(dim=dims)


def dt_reweight(policy_loss: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """The paper's gradient reweighting: the step's policy loss / |dt| (dt = sigma_next - sigma)."""
    dt = abs(float(sigma_next) - float(sigma))
    if dt == 0:
        raise ValueError("a step with dt = 0 cannot be reweighted by 1 / |dt| (--grpoguard_dt_reweight).")
    return policy_loss / dt

"""GRPO-Guard's normalised log-ratio: mean_CHW(eps * (mean_theta - mean_old)) for every Gaussian sampler and log-prob
variant (each sampler's step and log-prob re-derived here in float64), the paper's Flow-SDE formula, a hand-worked
sign / scale / clipping case, the |dt| reweighting, and the first chunk's ratio of exactly 1 on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from deepgen_rl.model.tiny import build_tiny_deepgen
from deepgen_rl.rl import clipped_policy_loss
from deepgen_rl.rl.grpo_guard import dt_reweight, guard_log_ratio
from deepgen_rl.sampling import rollout, sample_with_coefficients, step_coefficients, step_mean
from deepgen_rl.trainer.objective import ObjectiveSettings, policy_chunk_objective
from deepgen_rl.trainer.trainable import configure_trainable

S, S_NEXT = 0.7, 0.62


def _hand_step(sampler: str, x, v, eta: float):
    """(mean, noise std, sampler std s_t) of one step from S to S_NEXT in float64, from docs/algorithms.md#samplers."""
    dt = S_NEXT - S
    if sampler == "flow_sde":
        a = eta * math.sqrt(S / (1 - S))
        mean = x * (1 + a * a * dt / (2 * S)) + v * (1 + a * a * (1 - S) / (2 * S)) * dt
        return mean, a * math.sqrt(-dt), a
    if sampler == "cps_sde":
        s_t = S_NEXT * math.sin(eta * math.pi / 2)
        x0_hat, eps_hat = x - S * v, x + (1 - S) * v
        return (1 - S_NEXT) * x0_hat + math.sqrt(S_NEXT ** 2 - s_t ** 2) * eps_hat, s_t, s_t
    x0_hat = x - S * v  # dance_sde
    mean = x + (v + eta * eta / 2 * (x - (1 - S) * x0_hat) / (S * S + 1e-8)) * dt
    return mean, eta * math.sqrt(-dt), eta * math.sqrt(-dt)


def _log_prob(x_next, mean, std, variant):
    """Mean over latent dims of the Gaussian log-density (exact) or of -(x' - mean)^2 (CPS reference)."""
    sq = (x_next - mean).square().flatten(1).mean(1)
    if variant == "reference":
        return -sq
    return -sq / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi)


CASES = [("flow_sde", "exact", 0.7), ("cps_sde", "reference", 0.8), ("cps_sde", "exact", 0.8),
         ("dance_sde", "exact", 0.3)]


@pytest.mark.parametrize("sampler,variant,eta", CASES)
def test_normalised_log_ratio_is_mean_eps_times_mean_shift_for_every_sampler(sampler, variant, eta):
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 5)
    x, v_old, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    v_new = v_old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    coefs = step_coefficients(sampler, S, S_NEXT, eta=eta, sigma_max=None)
    rolled = sample_with_coefficients(x.float(), v_old.float(), coefs, variant, None, z.float())
    rho = guard_log_ratio(step_mean(x.float(), v_new.float(), coefs), rolled.mean, rolled.next_latents,
                          coefs.noise_std)
    # Independent value: the sampler's means re-derived in float64 and the noise the step was given.
    old_mean, noise_std, sampler_std = _hand_step(sampler, x, v_old, eta)
    new_mean, _, _ = _hand_step(sampler, x, v_new, eta)
    expected = (z * (new_mean - old_mean)).flatten(1).mean(1)
    assert expected.abs().min() > 1e-3  # a case where a wrong sign or scale shows
    torch.testing.assert_close(rho.double(), expected, rtol=1e-4, atol=1e-6)
    # The same quantity from each variant's log-ratio Delta (x' = mean_old + noise_std z), i.e. each sampler's form:
    x_next = old_mean + noise_std * z
    delta = _log_prob(x_next, new_mean, noise_std, variant) - _log_prob(x_next, old_mean, noise_std, variant)
    mse = (new_mean - old_mean).square().flatten(1).mean(1)
    if variant == "exact":  # Delta = mean(z dmu) / std - mse / (2 std^2)
        torch.testing.assert_close((delta + mse / (2 * noise_std ** 2)) * noise_std, expected)
    else:  # CPS reference: Delta = 2 std mean(z dmu) - mse
        torch.testing.assert_close((delta + mse) / (2 * noise_std), expected)
    # The reference's single formula Delta s + mse / (2 s), s = its sampler std x (sqrt(-dt) for flow / dance), is
    # the paper's Flow-SDE RatioNorm; it holds only where s is the noise std and the log-prob the exact Gaussian
    # (Flow-SDE; CPS exact, which the reference lacks) and is biased for its CPS default and Dance-SDE (section 5).
    s_ref = sampler_std * (math.sqrt(S - S_NEXT) if sampler != "cps_sde" else 1.0)
    reference_form = delta * s_ref + mse / (2 * s_ref)
    if variant == "exact" and sampler != "dance_sde":
        torch.testing.assert_close(reference_form, expected)
    else:
        assert (reference_form - expected).abs().max() > 0.1 * expected.abs().max()  # biased by >= 10%
    if sampler == "flow_sde":  # the paper's formula as written: (Delta + mse / (2 s^2)) s, s = sigma_t sqrt(-dt)
        torch.testing.assert_close((delta + mse / (2 * s_ref ** 2)) * s_ref, expected)


def test_hand_worked_sign_scale_and_asymmetric_clip():
    # eps = (x' - mean_old) / 0.5 = [1, -1]; mean - mean_old = [0.2, 0.1]: rho = (0.2 - 0.1) / 2 = 0.05.
    old = torch.zeros(1, 1, 1, 2)
    x_next = torch.tensor([0.5, -0.5]).reshape(1, 1, 1, 2)
    mean = torch.tensor([0.2, 0.1]).reshape(1, 1, 1, 2).requires_grad_(True)
    rho = guard_log_ratio(mean, old, x_next, 0.5)
    assert rho.item() == pytest.approx(0.05, abs=1e-7)
    # A = +1, band [0.9, 1.1]: unclipped, loss = -e^0.05; its gradient pushes the mean along the drawn noise:
    # d(-e^rho)/d mean = -e^0.05 * eps / 2.
    out = clipped_policy_loss(rho, torch.zeros(1), torch.ones(1), clip_range=0.1, advantage_clip=5.0)
    assert out.loss.item() == pytest.approx(-math.exp(0.05), rel=1e-6)
    out.loss.backward()
    assert mean.grad.flatten().tolist() == pytest.approx([-math.exp(0.05) / 2, math.exp(0.05) / 2], rel=1e-6)
    # --clip_range_low/high (-0.01, 0.02): ratio 1.0513 > 1.02 is clipped for A > 0: loss -1.02, no gradient.
    clipped = clipped_policy_loss(rho.detach().requires_grad_(True), torch.zeros(1), torch.ones(1), clip_range=0.1,
                                  advantage_clip=5.0, band=(-0.01, 0.02))
    assert clipped.loss.item() == pytest.approx(-1.02) and clipped.clip_fraction.item() == 1.0


def test_dt_reweight_divides_by_the_step_size():
    assert dt_reweight(torch.tensor(0.1), 0.8, 0.75).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="grpoguard_dt_reweight"):
        dt_reweight(torch.tensor(0.1), 0.5, 0.5)


def test_first_chunk_ratio_is_exactly_one_and_loss_is_reweighted():
    sampler, variant = "cps_sde", "reference"  # the default sampler (the others: the tensor test above)
    model = build_tiny_deepgen(seed=0)
    configure_trainable(model, "dit", None)
    trajectory = rollout(model, ["a red apple", "a blue sky"], group_size=2, sampler=sampler, eta=0.8,
                         logprob_variant=variant, num_inference_steps=4, height=64, width=64, cfg_scale=0.0,
                         init_same_noise=False, generator=torch.Generator().manual_seed(0), record_means=True)
    assert trajectory.means.shape == trajectory.latents[:, 1:].shape
    advantages, valid = torch.tensor([1.0, -2.0, 0.5, 1.5]), torch.ones(4, dtype=torch.bool)
    results = {}
    for reweight in (False, True):
        settings = ObjectiveSettings(clip_range=1e-4, advantage_clip=5.0, beta=0.0, kl_type="v-based",
                                     algorithm="grpoguard", dt_reweight=reweight)
        results[reweight] = policy_chunk_objective(model, trajectory, 1, slice(None), advantages=advantages,
                                                   valid=valid, settings=settings, reference=None,
                                                   reference_conditioning=None)
    assert results[False].ratio_max_dev == 0.0  # rho == 0 exactly at the rollout's weights
    assert results[False].loss.item() == pytest.approx(-0.25, abs=1e-7)  # -mean(A)
    dt = float(trajectory.sigmas[1] - trajectory.sigmas[2])
    assert results[True].loss.item() == pytest.approx(-0.25 / dt, rel=1e-6)
    no_means = rollout(model, ["a red apple"], group_size=2, sampler=sampler, eta=0.8, logprob_variant=variant,
                       num_inference_steps=4, height=64, width=64, cfg_scale=0.0, init_same_noise=False,
                       generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="grpoguard"):
        policy_chunk_objective(model, no_means, 1, slice(None), advantages=advantages[:2], valid=valid[:2],
                               settings=settings, reference=None, reference_conditioning=None)

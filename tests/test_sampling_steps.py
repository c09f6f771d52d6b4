"""One-step samplers against closed forms written out here (docs/algorithms.md#samplers), torch.distributions and
empirical statistics, through the functions the rollout and the training recompute call: ``step_coefficients``,
``sample_with_coefficients`` (rollout), ``step_mean`` + ``gaussian_log_prob`` (recompute)."""

import math

import pytest
import torch
from torch.distributions import Normal

from deepgen_rl.sampling.steps import effective_logprob_variant, gaussian_log_prob, sample_with_coefficients
from deepgen_rl.sampling.steps import step_coefficients, step_mean, transition_mean

DIMS = (1, 2, 3)


def sample_step(sampler, x, v, s, s_next, *, eta, variant="exact", sigma_max=None, generator=None, noise=None):
    """One sampled step as the rollout's denoise loop takes it."""
    coefs = step_coefficients(sampler, s, s_next, eta=eta, sigma_max=sigma_max)
    return sample_with_coefficients(x, v, coefs, effective_logprob_variant(sampler, variant), generator, noise)


def recomputed_log_prob(sampler, x, x_next, v, s, s_next, *, eta, variant, sigma_max=None):
    """The log-prob of a given transition as ``recompute_step`` scores it."""
    coefs = step_coefficients(sampler, s, s_next, eta=eta, sigma_max=sigma_max)
    return gaussian_log_prob(x_next, step_mean(x, v, coefs), coefs.noise_std,
                             effective_logprob_variant(sampler, variant))


def _xv(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 3, 5, generator=g), torch.randn(n, 4, 3, 5, generator=g)


def _cps_by_hand(x, v, s, s_next, eta):
    """The CPS paper / reference formula: x0_hat, eps_hat, s_t = s' sin(eta pi / 2)."""
    s_t = s_next * math.sin(eta * math.pi / 2)
    x0_hat = x - s * v
    eps_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0_hat + math.sqrt(s_next ** 2 - s_t ** 2) * eps_hat
    return mean, s_t


def _flow_by_hand(x, v, s, s_next, eta, sigma_max):
    """Flow-GRPO: a = eta sqrt(s / (1 - s)) (sigma_max in the denominator at s == 1)."""
    dt = s_next - s
    a = eta * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))
    mean = x * (1 + a ** 2 * dt / (2 * s)) + v * (1 + a ** 2 * (1 - s) / (2 * s)) * dt
    return mean, a, a * math.sqrt(-dt)


@pytest.mark.parametrize("s,s_next,eta", [(0.9, 0.75, 1.0), (0.5, 0.3, 0.6), (0.2, 0.05, 0.3)])
def test_cps_exact_log_prob_is_the_gaussian_density(s, s_next, eta):
    x, v = _xv()
    g = torch.Generator().manual_seed(1)
    res = sample_step("cps_sde", x, v, s, s_next, eta=eta, variant="exact", generator=g)
    mean, s_t = _cps_by_hand(x, v, s, s_next, eta)
    torch.testing.assert_close(res.mean, mean, rtol=1e-5, atol=1e-6)
    assert res.sampler_std == pytest.approx(s_t) and res.noise_std == pytest.approx(s_t)
    expected = Normal(mean, s_t).log_prob(res.next_latents).mean(DIMS)
    torch.testing.assert_close(res.log_prob, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s,s_next,eta", [(0.9, 0.75, 1.0), (0.5, 0.3, 0.6)])
def test_cps_reference_log_prob_matches_the_reference_formula(s, s_next, eta):
    x, v = _xv(2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    res = sample_step("cps_sde", x, v, s, s_next, eta=eta, variant="reference", noise=noise)
    mean, s_t = _cps_by_hand(x, v, s, s_next, eta)
    x_next = mean + s_t * noise
    torch.testing.assert_close(res.next_latents, x_next, rtol=1e-5, atol=1e-6)
    # reference: log_prob = -((prev_sample - prev_sample_mean) ** 2), averaged over all but the batch dim
    expected = -((x_next - mean) ** 2).mean(DIMS)
    torch.testing.assert_close(res.log_prob, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(res.log_prob, Normal(mean, s_t).log_prob(x_next).mean(DIMS))


@pytest.mark.parametrize("s,s_next,eta", [(1.0, 0.93, 0.7), (0.6, 0.45, 0.7), (0.3, 0.0, 0.5)])
def test_flow_sde_log_prob_is_the_gaussian_density(s, s_next, eta):
    x, v = _xv(4)
    sigma_max = 0.93
    res = sample_step("flow_sde", x, v, s, s_next, eta=eta, sigma_max=sigma_max,
                      generator=torch.Generator().manual_seed(5))
    mean, a, std = _flow_by_hand(x, v, s, s_next, eta, sigma_max)
    torch.testing.assert_close(res.mean, mean, rtol=1e-5, atol=1e-6)
    assert res.sampler_std == pytest.approx(a) and res.noise_std == pytest.approx(std)
    expected = Normal(mean, std).log_prob(res.next_latents).mean(DIMS)
    torch.testing.assert_close(res.log_prob, expected, rtol=1e-5, atol=1e-5)


def test_cps_step_statistics_match_the_closed_form():
    torch.manual_seed(0)
    x, v = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    s, s_next, eta, draws = 0.8, 0.6, 0.7, 40000
    res = sample_step("cps_sde", x.expand(draws, -1, -1, -1), v.expand(draws, -1, -1, -1), s, s_next, eta=eta,
                      variant="reference", generator=torch.Generator().manual_seed(6))
    mean, s_t = _cps_by_hand(x, v, s, s_next, eta)
    emp_mean, emp_std = res.next_latents.mean(0), res.next_latents.std(0)
    assert torch.allclose(emp_mean, mean[0], atol=5 * s_t / math.sqrt(draws))
    assert torch.allclose(emp_std, torch.full_like(emp_std, s_t), rtol=0.03)


def test_flow_sde_step_statistics_match_the_closed_form():
    torch.manual_seed(1)
    x, v = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    s, s_next, eta, draws = 0.7, 0.5, 0.7, 40000
    res = sample_step("flow_sde", x.expand(draws, -1, -1, -1), v.expand(draws, -1, -1, -1), s, s_next, eta=eta,
                      sigma_max=0.95, generator=torch.Generator().manual_seed(7))
    mean, _, std = _flow_by_hand(x, v, s, s_next, eta, 0.95)
    assert torch.allclose(res.next_latents.mean(0), mean[0], atol=5 * std / math.sqrt(draws))
    assert torch.allclose(res.next_latents.std(0), torch.full((2, 2, 2), std), rtol=0.03)


def test_flow_sde_at_eta_zero_is_the_ode_step():
    x, v = _xv(8)
    for s, s_next in [(1.0, 0.9), (0.55, 0.4), (0.2, 0.0)]:
        sde = sample_step("flow_sde", x, v, s, s_next, eta=0.0, sigma_max=0.9,
                          generator=torch.Generator().manual_seed(0))
        ode_coefs = step_coefficients("ode", s, s_next, eta=0.0, sigma_max=None)
        ode = step_mean(x, v, ode_coefs)  # the rollout's ODE step (and evaluation's)
        assert torch.equal(sde.next_latents, ode)
        torch.testing.assert_close(ode, x + (s_next - s) * v)
        assert ode_coefs.sampler_std == 0.0 and ode_coefs.noise_std == 0.0


def test_cps_at_eta_zero_is_deterministic_ddim():
    x, v = _xv(9)
    res = sample_step("cps_sde", x, v, 0.7, 0.4, eta=0.0, variant="exact", generator=torch.Generator().manual_seed(0))
    # eta = 0: x' = (1 - s') x0_hat + s' eps_hat (deterministic), the degenerate log-prob is reported as 0
    torch.testing.assert_close(res.next_latents, 0.6 * (x - 0.7 * v) + 0.4 * (x + 0.3 * v))
    assert torch.equal(res.log_prob, torch.zeros(3))


def test_given_noise_and_generator_paths_agree():
    x, v = _xv(10)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    by_gen = sample_step("cps_sde", x, v, 0.5, 0.4, eta=1.0, variant="reference", generator=g1)
    noise = torch.randn(x.shape, generator=g2)
    by_noise = sample_step("cps_sde", x, v, 0.5, 0.4, eta=1.0, variant="reference", noise=noise)
    assert torch.equal(by_gen.next_latents, by_noise.next_latents)
    with pytest.raises(ValueError, match="noise has shape"):
        sample_step("cps_sde", x, v, 0.5, 0.4, eta=1.0, variant="reference", noise=torch.randn(2, 4, 3, 5))


@pytest.mark.parametrize("sampler,variant", [("cps_sde", "reference"), ("cps_sde", "exact"), ("flow_sde", "exact")])
def test_recompute_scores_the_sampled_step_exactly(sampler, variant):
    x, v = _xv(12)
    res = sample_step(sampler, x, v, 0.8, 0.65, eta=0.8, sigma_max=0.9, variant=variant,
                      generator=torch.Generator().manual_seed(13))
    again = recomputed_log_prob(sampler, x, res.next_latents, v, 0.8, 0.65, eta=0.8, sigma_max=0.9, variant=variant)
    assert torch.equal(again, res.log_prob)
    assert torch.equal(transition_mean(x, v, 0.8, 0.65, sampler=sampler, eta=0.8, sigma_max=0.9), res.mean)
    # Under another model output the same transition is scored with that output's mean (by hand here).
    v2 = v + 0.5
    other = recomputed_log_prob(sampler, x, res.next_latents, v2, 0.8, 0.65, eta=0.8, sigma_max=0.9, variant=variant)
    if sampler == "cps_sde":
        mean2, std = _cps_by_hand(x, v2, 0.8, 0.65, 0.8)
    else:
        mean2, _, std = _flow_by_hand(x, v2, 0.8, 0.65, 0.8, 0.9)
    if variant == "reference":
        expected = -((res.next_latents - mean2) ** 2).mean(DIMS)
    else:
        expected = Normal(mean2, std).log_prob(res.next_latents).mean(DIMS)
    torch.testing.assert_close(other, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, res.log_prob)


def test_sampler_std_by_hand():
    sig = [1.0, 0.8, 0.5, 0.0]
    cps = [step_coefficients("cps_sde", sig[i], sig[i + 1], eta=0.5, sigma_max=sig[1]).sampler_std for i in range(3)]
    assert cps == pytest.approx([0.8 * math.sin(0.25 * math.pi), 0.5 * math.sin(0.25 * math.pi), 0.0])
    flow = [step_coefficients("flow_sde", sig[i], sig[i + 1], eta=0.7, sigma_max=sig[1]).sampler_std for i in range(3)]
    # a = eta sqrt(s / (1 - s)), with sigmas[1] = 0.8 in the denominator where s == 1
    assert flow == pytest.approx([0.7 * math.sqrt(1.0 / (1 - 0.8)), 0.7 * math.sqrt(0.8 / 0.2),
                                  0.7 * math.sqrt(0.5 / 0.5)])


def test_exact_log_prob_with_zero_std_is_zero_and_reference_is_minus_msd():
    x = torch.ones(2, 1, 2, 2)
    assert torch.equal(gaussian_log_prob(x, x, 0.0, "exact"), torch.zeros(2))
    assert torch.equal(gaussian_log_prob(x + 2, x, 0.0, "reference"), torch.full((2,), -4.0))


def test_bad_arguments_name_the_problem():
    x, v = _xv()
    with pytest.raises(ValueError, match="sigma_max"):
        step_coefficients("flow_sde", 1.0, 0.9, eta=0.7, sigma_max=None)
    with pytest.raises(ValueError, match="sampler must be one of"):
        step_coefficients("ddim", 0.5, 0.4, eta=1.0, sigma_max=None)
    with pytest.raises(ValueError, match="logprob_variant"):
        sample_step("cps_sde", x, v, 0.5, 0.4, eta=1.0, variant="approx")


def _dance_by_hand(x, v, s, s_next, eta):
    """The reference's Dance-SDE step as written (docs/algorithms.md#dance-sde), in float64."""
    x, v = x.double(), v.double()
    dt = s_next - s
    x0_hat = x - s * v
    correction = 0.5 * eta ** 2 * (x - (1 - s) * x0_hat) / (s ** 2 + 1e-8)
    return x + (v + correction) * dt, eta * math.sqrt(-dt)


@pytest.mark.parametrize("s,s_next,eta", [(1.0, 0.96, 1.0), (0.6, 0.5, 0.3), (0.1, 0.0, 1.0)])
def test_dance_sde_mean_std_and_log_prob_are_the_closed_form(s, s_next, eta):
    x, v = _xv(3)
    res = sample_step("dance_sde", x, v, s, s_next, eta=eta, generator=torch.Generator().manual_seed(2))
    mean, std = _dance_by_hand(x, v, s, s_next, eta)
    torch.testing.assert_close(res.mean.double(), mean, rtol=1e-5, atol=1e-5)
    # The reference returns the noise std eta sqrt(-dt) as the sampler std (what the KL divides by).
    assert res.noise_std == pytest.approx(std) and res.sampler_std == pytest.approx(std)
    expected = Normal(mean, std).log_prob(res.next_latents.double()).mean(DIMS)
    torch.testing.assert_close(res.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # The recompute path scores the sampled transition bit for bit (the variant flag does not apply to Dance).
    recomputed = recomputed_log_prob("dance_sde", x, res.next_latents, v, s, s_next, eta=eta, variant="reference")
    assert torch.equal(recomputed, res.log_prob)


def test_dance_sde_step_statistics_match_the_closed_form():
    torch.manual_seed(2)
    x, v = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    s, s_next, eta, draws = 0.7, 0.6, 0.8, 40000
    res = sample_step("dance_sde", x.expand(draws, -1, -1, -1), v.expand(draws, -1, -1, -1), s, s_next, eta=eta,
                      generator=torch.Generator().manual_seed(8))
    mean, std = _dance_by_hand(x, v, s, s_next, eta)
    assert torch.allclose(res.next_latents.mean(0).double(), mean[0], atol=5 * std / math.sqrt(draws))
    assert torch.allclose(res.next_latents.std(0), torch.full((2, 2, 2), std), rtol=0.03)


def test_dance_sde_schedule_and_eta_zero():
    sigmas = [1.0, 0.75, 0.4, 0.0]
    expected = [0.3 * math.sqrt(0.25), 0.3 * math.sqrt(0.35), 0.3 * math.sqrt(0.4)]
    got = [step_coefficients("dance_sde", s, s_next, eta=0.3, sigma_max=None).sampler_std
           for s, s_next in zip(sigmas, sigmas[1:])]
    assert got == pytest.approx(expected, rel=1e-6)
    x, v = _xv(9)
    res = sample_step("dance_sde", x, v, 0.55, 0.4, eta=0.0, generator=torch.Generator().manual_seed(0))
    ode = sample_step("ode", x, v, 0.55, 0.4, eta=0.0)
    torch.testing.assert_close(res.next_latents, ode.next_latents, rtol=0, atol=1e-6)

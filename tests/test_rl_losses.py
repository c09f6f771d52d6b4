"""Policy loss, KL, SFT-aux loss and the training-step sampler against hand-worked values."""

import math

import pytest
import torch

from deepgen_rl.rl.losses import (
    clip_band,
    clipped_policy_loss,
    flow_matching_loss,
    grpo_loss,
    kl_v_based,
    kl_x_based,
    noised_latents,
    reference_kl,
)
from deepgen_rl.rl.timesteps import num_train_steps, sample_train_steps


def test_clipped_loss_hand_worked():
    # ratios 1.2, 0.7, 1.0, 0.95, 0.7 with c = 0.1; advantages 1, -1, 2, 0.5, 1
    ratios = [1.2, 0.7, 1.0, 0.95, 0.7]
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0])
    old = torch.zeros(5)
    new = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    res = clipped_policy_loss(new, old, adv, clip_range=0.1, advantage_clip=5.0)
    # per sample max(-A r, -A clip(r, 0.9, 1.1)):
    #   A=1,  r=1.2:  max(-1.2, -1.1)   = -1.1   (clipped: no gradient)
    #   A=-1, r=0.7:  max(0.7, 0.9)     = 0.9    (clipped)
    #   A=2,  r=1.0:  max(-2, -2)       = -2
    #   A=.5, r=.95:  max(-.475, -.475) = -0.475
    #   A=1,  r=0.7:  max(-0.7, -0.9)   = -0.7   (unclipped: the pessimistic side keeps the gradient)
    expected = (-1.1 + 0.9 - 2.0 - 0.475 - 0.7) / 5
    assert res.loss.item() == pytest.approx(expected, rel=1e-6)
    assert res.clip_fraction.item() == pytest.approx(3 / 5)  # |r - 1| > 0.1 for 1.2, 0.7, 0.7
    res.loss.backward()
    # d/dlogp of -A r = -A r / 5 where unclipped; 0 where the clipped branch won
    assert new.grad.tolist() == pytest.approx([0.0, 0.0, -2.0 / 5, -0.5 * 0.95 / 5, -0.7 / 5], rel=1e-6)


def test_signed_band_clips_at_one_plus_low_and_one_plus_high():
    # band (-0.2, 0.1): ratios clip to [0.8, 1.1]; ratios 1.15 (A=1), 0.85 (A=-1), 0.75 (A=-1)
    new = torch.tensor([math.log(1.15), math.log(0.85), math.log(0.75)], requires_grad=True)
    res = clipped_policy_loss(new, torch.zeros(3), torch.tensor([1.0, -1.0, -1.0]), clip_range=0.05,
                              advantage_clip=5.0, band=clip_band(0.05, -0.2, 0.1))
    # max(-1.15, -1.1) = -1.1 (clipped); max(0.85, 0.85) = 0.85 (inside); max(0.75, 0.8) = 0.8 (clipped)
    assert res.loss.item() == pytest.approx((-1.1 + 0.85 + 0.8) / 3, rel=1e-6)
    assert res.clip_fraction.item() == pytest.approx(2 / 3)
    res.loss.backward()
    assert new.grad.tolist() == pytest.approx([0.0, 0.85 / 3, 0.0], rel=1e-6)
    assert clip_band(1e-4) == (-1e-4, 1e-4)


def test_advantages_are_clipped_and_masked_samples_ignored():
    new = torch.zeros(3, requires_grad=True)
    res = clipped_policy_loss(new, torch.zeros(3), torch.tensor([7.0, -1.0, 100.0]), clip_range=1e-4,
                              advantage_clip=5.0, mask=torch.tensor([True, True, False]))
    assert res.loss.item() == pytest.approx((-5.0 + 1.0) / 2)  # ratio 1, A clipped to 5, third sample masked
    assert res.ratio_mean.item() == pytest.approx(1.0)
    empty = clipped_policy_loss(new, torch.zeros(3), torch.ones(3), clip_range=0.1, advantage_clip=5.0,
                                mask=torch.zeros(3, dtype=torch.bool))
    assert empty.loss.item() == 0.0


def test_kl_is_zero_for_identical_policies():
    v = torch.randn(2, 4, 3, 3)
    assert torch.equal(kl_v_based(v, v.clone(), 0.3), torch.zeros(2))
    assert torch.equal(kl_x_based(v, v.clone(), torch.tensor([0.3, 0.5])), torch.zeros(2))


def test_kl_hand_checked():
    v_ref = torch.zeros(2, 2, 2, 2)
    v = v_ref.clone()
    v[0] = 0.3  # every element differs by 0.3 -> mean sq 0.09
    v[1, 0] = 1.0  # half the elements differ by 1 -> mean sq 0.5
    s_t = 0.2
    expected = [0.09 / (2 * 0.04 + 1e-7), 0.5 / (2 * 0.04 + 1e-7)]
    assert kl_v_based(v, v_ref, s_t).tolist() == pytest.approx(expected, rel=1e-5)
    expected_x = [0.09 / (2 * 0.25 + 1e-7), 0.5 / (2 * 0.25 + 1e-7)]
    assert kl_x_based(v, v_ref, 0.5).tolist() == pytest.approx(expected_x, rel=1e-5)
    assert reference_kl("x-based", sampler_std=0.5, mean=v, ref_mean=v_ref).tolist() == pytest.approx(expected_x,
                                                                                                   rel=1e-5)
    assert reference_kl("v-based", sampler_std=s_t, velocity=v, ref_velocity=v_ref).tolist() == pytest.approx(
        expected, rel=1e-5)
    with pytest.raises(ValueError, match="--atrain_kl_type"):
        reference_kl("js", sampler_std=0.1, velocity=v, ref_velocity=v_ref)
    with pytest.raises(ValueError, match="needs velocity"):
        reference_kl("v-based", sampler_std=0.1)


def test_grpo_loss_adds_beta_times_mean_kl():
    policy = torch.tensor(0.25)
    kl = torch.tensor([2.0, 4.0, 100.0])
    assert grpo_loss(policy, kl, 0.5, mask=torch.tensor([True, True, False])).item() == pytest.approx(0.25 + 0.5 * 3.0)
    assert grpo_loss(policy, kl, 0.0).item() == 0.25


def test_flow_matching_loss_and_interpolation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = noised_latents(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    torch.testing.assert_close(xt[2], eps[2])
    assert flow_matching_loss(eps - x0, x0, eps).item() == 0.0
    assert flow_matching_loss(eps - x0 + 0.3, x0, eps).item() == pytest.approx(0.09, rel=1e-5)


def test_train_step_sampler():
    assert num_train_steps(50, 0.6) == 30
    assert num_train_steps(10, 1.0) == 9  # never the last step
    assert num_train_steps(3, 0.1) == 1
    steps = sample_train_steps(50, 0.6, torch.Generator().manual_seed(0))
    assert len(steps) == 30 == len(set(steps)) and min(steps) >= 0 and max(steps) <= 48
    assert steps == sorted(steps)
    assert steps == sample_train_steps(50, 0.6, torch.Generator().manual_seed(0))
    assert steps != sample_train_steps(50, 0.6, torch.Generator().manual_seed(1))
    assert sample_train_steps(10, 1.0, torch.Generator().manual_seed(0)) == list(range(9))
    with pytest.raises(ValueError, match="--timestep_fraction"):
        num_train_steps(10, 0.0)
    with pytest.raises(ValueError, match="--num_inference_steps"):
        num_train_steps(1, 0.5)

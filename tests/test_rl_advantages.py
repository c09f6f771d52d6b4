"""GRPO / GDPO advantages against values worked out here with plain Python arithmetic."""

import math

import pytest
import torch

from deepgen_rl.rl.advantages import compute_advantages, gdpo_advantages, grpo_advantages

NAN = float("nan")


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # unbiased, as torch.Tensor.std
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _normalise(xs, floor=0.0):
    m, sd = _mean(xs), _std(xs)
    return [(x - m) / (max(sd, floor) + 1e-4) for x in xs]


# 2 prompts x 4 samples, 2 rewards. Prompt A's dataset uses both rewards (weights 1.0 and 0.5); prompt B's
# dataset uses only reward 0, so its reward-1 scores were never computed (NaN).
REWARDS = [[0.2, 1.0], [0.4, 0.0], [0.6, 0.0], [0.8, 1.0],
           [0.5, NAN], [0.5, NAN], [0.9, NAN], [0.1, NAN]]
WEIGHTS = [[1.0, 0.5]] * 4 + [[1.0, 0.0]] * 4


def test_gdpo_hand_worked_two_prompts_four_samples_two_rewards():
    res = gdpo_advantages(torch.tensor(REWARDS), torch.tensor(WEIGHTS), 4, std_floor=0.0, zero_variance_rtol=0.0,
        clip=5.0)

    # Prompt A, reward 0: mean 0.5, deviations -0.3 -0.1 0.1 0.3, unbiased var 0.2 / 3.
    sd = math.sqrt(0.2 / 3)
    a_r0 = [-0.3 / (sd + 1e-4), -0.1 / (sd + 1e-4), 0.1 / (sd + 1e-4), 0.3 / (sd + 1e-4)]
    assert a_r0 == pytest.approx(_normalise([0.2, 0.4, 0.6, 0.8]))
    # Prompt A, reward 1: mean 0.5, deviations +-0.5, unbiased var 1 / 3.
    sd1 = math.sqrt(1 / 3)
    a_r1 = [0.5 / (sd1 + 1e-4), -0.5 / (sd1 + 1e-4), -0.5 / (sd1 + 1e-4), 0.5 / (sd1 + 1e-4)]
    # Prompt B, reward 0 only: mean 0.5, deviations 0 0 0.4 -0.4, unbiased var 0.32 / 3.
    sd_b = math.sqrt(0.32 / 3)
    b_r0 = [0.0, 0.0, 0.4 / (sd_b + 1e-4), -0.4 / (sd_b + 1e-4)]
    summed = [1.0 * a + 0.5 * b for a, b in zip(a_r0, a_r1)] + b_r0
    expected = [max(-5.0, min(5.0, x)) for x in _normalise(summed)]

    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res.valid.all() and res.num_valid == 8 and res.num_groups == 2
    assert res.zero_variance_group_fraction == 0.0 and res.clip_fraction == 0.0


def test_grpo_hand_worked_weighted_sum_then_group_normalisation():
    res = grpo_advantages(torch.tensor(REWARDS), torch.tensor(WEIGHTS), 4, std_floor=0.0, zero_variance_rtol=0.0,
        clip=5.0)
    total_a = [0.2 + 0.5, 0.4, 0.6, 0.8 + 0.5]  # r0 + 0.5 r1
    total_b = [0.5, 0.5, 0.9, 0.1]
    expected = _normalise(total_a) + _normalise(total_b)
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_gdpo_with_one_reward_is_grpo_then_batch_normalised():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, 1, generator=g)
    weights = torch.ones(12, 1)
    grpo = grpo_advantages(rewards, weights, 3, std_floor=0.0, zero_variance_rtol=0.0, clip=100.0).advantages.double()
    gdpo = gdpo_advantages(rewards, weights, 3, std_floor=0.0, zero_variance_rtol=0.0, clip=100.0).advantages
    torch.testing.assert_close(gdpo, ((grpo - grpo.mean()) / (grpo.std() + 1e-4)).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gdpo, grpo.float())  # the batch normalisation does change the scale


def test_invalid_samples_are_excluded_from_their_group_and_get_zero():
    rewards = [row[:] for row in REWARDS]
    rewards[2] = [NAN, NAN]  # the reward server failed on sample 2
    valid = torch.tensor([True, True, False, True, True, True, True, True])
    res = gdpo_advantages(torch.tensor(rewards), torch.tensor(WEIGHTS), 4, valid=valid, std_floor=0.0, zero_variance_rtol=0.0,
        clip=5.0)
    a_r0 = _normalise([0.2, 0.4, 0.8])
    a_r1 = _normalise([1.0, 0.0, 1.0])
    summed = [a + 0.5 * b for a, b in zip(a_r0, a_r1)] + _normalise([0.5, 0.5, 0.9, 0.1])
    batch = _normalise(summed)
    expected = batch[:2] + [0.0] + batch[2:]
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res.valid.tolist() == valid.tolist() and res.num_valid == 7


def test_group_with_one_valid_sample_carries_no_signal():
    rewards = torch.tensor([[1.0], [0.0], [0.3], [0.9]])
    valid = torch.tensor([True, False, True, True])
    res = grpo_advantages(rewards, torch.ones(4, 1), 2, valid=valid, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0)
    assert res.advantages[:2].tolist() == [0.0, 0.0]
    assert res.advantages[2:].tolist() == pytest.approx(_normalise([0.3, 0.9]), rel=1e-5)
    assert res.zero_variance_group_fraction == 0.5


def test_std_floor_bounds_near_constant_rewards():
    rewards = torch.tensor([[0.5], [0.5], [0.5], [0.5003]])
    plain = grpo_advantages(rewards, torch.ones(4, 1), 4, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0).advantages
    floored = grpo_advantages(rewards, torch.ones(4, 1), 4, std_floor=0.1, zero_variance_rtol=0.0, clip=5.0).advantages
    xs = [0.5, 0.5, 0.5, 0.5003]
    m = _mean(xs)
    assert floored.tolist() == pytest.approx([(x - m) / (0.1 + 1e-4) for x in xs], rel=1e-4, abs=1e-7)
    assert plain.tolist() == pytest.approx(_normalise(xs), rel=1e-4)
    assert plain.abs().max() > 0.5 > 100 * floored.abs().max()


def test_clipping_and_clip_fraction():
    rewards = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    res = grpo_advantages(rewards, torch.ones(4, 1), 4, std_floor=0.0, zero_variance_rtol=0.0, clip=1.0)
    raw = _normalise([0.0, 0.0, 0.0, 1.0])  # -0.5, -0.5, -0.5, 1.5 (up to the 1e-4)
    assert res.advantages.tolist() == pytest.approx([max(-1.0, min(1.0, x)) for x in raw], rel=1e-5)
    assert res.clip_fraction == 0.25


def test_zero_variance_group_fraction():
    # Three groups: constant; varying; reward 0 constant but unused reward 1 varying (still no signal).
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.2, 0.0], [0.7, 0.0], [0.5, 0.1], [0.5, 0.9]])
    weights = torch.tensor([[1.0, 0.0]] * 6)
    for fn in (gdpo_advantages, grpo_advantages):
        res = fn(rewards, weights, 2, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0)
        assert res.zero_variance_group_fraction == pytest.approx(2 / 3)
        assert res.advantages[[0, 1, 4, 5]].abs().max() < 1e-6


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="marked valid"):
        gdpo_advantages(torch.tensor([[NAN], [1.0]]), torch.ones(2, 1), 2, std_floor=0.0, zero_variance_rtol=0.0,
            clip=5.0)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(5, 1), torch.ones(5, 1), 2, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0)
    with pytest.raises(ValueError, match="weights must match"):
        grpo_advantages(torch.zeros(4, 2), torch.ones(4, 1), 2, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0)
    with pytest.raises(ValueError, match="--atrain_adv_type"):
        compute_advantages("ppo", torch.zeros(4, 1), torch.ones(4, 1), 2, std_floor=0.0, zero_variance_rtol=0.0,
            clip=5.0)
    with pytest.raises(ValueError, match="--advantage_clip"):
        grpo_advantages(torch.rand(4, 1), torch.ones(4, 1), 2, std_floor=0.0, zero_variance_rtol=0.0, clip=0.0)


# Issue 11 item 9: float noise must not become an advantage. Group 0: seven 0.35 and one 0.35 + 1 float32 ulp
# (3e-8); group 1: a real 0.05 gap. Rewards are float32 as the reward step produces them.
NOISE_GROUP = [0.35] * 7 + [0.35 + 3e-8]
REAL_GROUP = [0.35] * 7 + [0.40]


@pytest.mark.parametrize("adv_type", ["gdpo", "grpo"])
def test_float_noise_group_is_zero_variance_for_every_advantage_type(adv_type):
    rewards = torch.tensor([[x] for x in NOISE_GROUP + REAL_GROUP])
    assert rewards[7, 0] != rewards[0, 0]  # the noise survives float32: without the tolerance it would count
    res = compute_advantages(adv_type, rewards, torch.ones(16, 1), 8, std_floor=0.0, zero_variance_rtol=1e-5,
                             clip=5.0)
    real = _normalise([float(x) for x in rewards[8:, 0]])  # group z-scores of the real gap
    if adv_type == "gdpo":  # the noise group's S is 0; batch normalisation over all 16 samples
        expected = [max(-5.0, min(5.0, x)) for x in _normalise([0.0] * 8 + real)]
        expected[:8] = [0.0] * 8
    else:
        expected = [0.0] * 8 + real
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res.advantages[:8].abs().max() == 0.0
    assert res.zero_variance_group_fraction == 0.5


def test_zero_variance_tolerance_is_relative_to_the_rewards_magnitude():
    # The same 1e-4 gap: noise on rewards of magnitude 100 (rel 1e-6), a signal on rewards of magnitude 1e-3.
    big = torch.tensor([[100.0]] * 3 + [[100.0001]], dtype=torch.float64)
    small = torch.tensor([[0.001]] * 3 + [[0.0011]], dtype=torch.float64)
    for adv_type in ("gdpo", "grpo"):
        flat = compute_advantages(adv_type, big, torch.ones(4, 1), 4, std_floor=0.0, zero_variance_rtol=1e-5, clip=5.0)
        kept = compute_advantages(adv_type, small, torch.ones(4, 1), 4, std_floor=0.0, zero_variance_rtol=1e-5,
                                  clip=5.0)
        assert flat.zero_variance_group_fraction == 1.0 and flat.advantages.abs().max() == 0.0
        assert kept.zero_variance_group_fraction == 0.0 and kept.advantages.abs().max() > 0.1
    # With the tolerance off, the big group's 1e-6 relative gap is (wrongly) a signal: the tolerance is what acts.
    off = grpo_advantages(big, torch.ones(4, 1), 4, std_floor=0.0, zero_variance_rtol=0.0, clip=5.0)
    assert off.zero_variance_group_fraction == 0.0 and off.advantages.abs().max() > 0.1


# Issue 30: near 0 the relative tolerance is no help (max|r| is itself tiny): seven 0.0 and one 3e-8 (a scorer's
# rounding on O(1) intermediates) had std 1.06e-8 > the old 1e-8 floor and became |A| = 1.75 under GDPO.
@pytest.mark.parametrize("adv_type", ["gdpo", "grpo"])
def test_rounding_spread_near_zero_is_zero_variance_but_a_small_real_spread_normalises(adv_type):
    noise = [0.0] * 7 + [3e-8]  # std = 3e-8 / sqrt(8) ~ 1.06e-8 (see below): below 1e-6 + 1e-5 * 3e-8
    small = [0.0] * 7 + [1e-4]  # std ~ 3.5e-5: far above the floor (a real 1e-4 gap)
    big = [100.0] * 7 + [100.01]  # std ~ 3.5e-3 > 1e-5 * 100.01 + 1e-6 ~ 1.0e-3: real at magnitude 100
    rewards = torch.tensor([[x] for x in noise + small + big], dtype=torch.float64)
    res = compute_advantages(adv_type, rewards, torch.ones(24, 1), 8, std_floor=0.0, zero_variance_rtol=1e-5,
                             clip=5.0)
    # One outlier d among seven 0.0: mean d/8; deviations -d/8 (x7) and 7d/8; unbiased var (7/64 + 49/64) d^2 / 7
    # = d^2 / 8, so std = d / sqrt(8) and the z-scores are (-d/8) / (std + 1e-4) (x7) and (7d/8) / (std + 1e-4).
    d = 1e-4
    sd = math.sqrt((7 * (d / 8) ** 2 + (7 * d / 8) ** 2) / 7)
    assert sd == pytest.approx(d / math.sqrt(8))
    z_small = [(-d / 8) / (sd + 1e-4)] * 7 + [(7 * d / 8) / (sd + 1e-4)]
    assert z_small == pytest.approx(_normalise(small))
    z_big = _normalise(big)
    if adv_type == "gdpo":  # S = the z-scores (one reward); batch-normalised over all 24, the noise group's S is 0
        batch = _normalise([0.0] * 8 + z_small + z_big)
        expected = [0.0] * 8 + [max(-5.0, min(5.0, x)) for x in batch[8:]]
    else:
        expected = [0.0] * 8 + z_small + z_big
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res.advantages[:8].abs().max() == 0.0
    assert res.advantages[8:].abs().max() > 0.3  # the small spread is a signal, not floored away
    assert res.zero_variance_group_fraction == pytest.approx(1 / 3)


def test_gdpo_group_is_zero_variance_only_when_every_used_reward_is():
    # Group 0: reward 0 is noise, reward 1 really varies -> keeps its signal from reward 1 only.
    # Group 1: both rewards are noise -> zero-variance.
    r0 = [0.35, 0.35, 0.35, 0.35 + 3e-8] + [0.6, 0.6, 0.6 + 6e-8, 0.6]
    r1 = [0.1, 0.9, 0.5, 0.5] + [0.2, 0.2 + 2e-8, 0.2, 0.2]
    rewards = torch.tensor([[a, b] for a, b in zip(r0, r1)])
    res = gdpo_advantages(rewards, torch.ones(8, 2), 4, std_floor=0.0, zero_variance_rtol=1e-5, clip=5.0)
    summed = [0.0 + x for x in _normalise([float(v) for v in rewards[:4, 1]])] + [0.0] * 4
    expected = _normalise(summed)[:4] + [0.0] * 4
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert res.zero_variance_group_fraction == 0.5


# The reference's published example (docs/algorithms.md#advantages): two rewards, n = 4, weights (0.5, 2).
REF_R1 = [1, 2, 3, 4, 1, 1, 1, 1]
REF_R2 = [0, 0, 1, 1, 0, 1, 0, 1]
REF_REWARDS = torch.tensor([[a, b] for a, b in zip(REF_R1, REF_R2)], dtype=torch.float32)
REF_WEIGHTS = torch.tensor([[0.5, 2.0]] * 8)


def test_reinforcepp_matches_the_references_published_example():
    res = compute_advantages("reinforcepp", REF_REWARDS, REF_WEIGHTS, 4, std_floor=0.0, zero_variance_rtol=1e-5,
                             clip=5.0)
    # Published (3 decimals): [-0.959, -0.611, 1.134, 1.483 | -0.959, 0.436, -0.959, 0.436].
    assert res.advantages.tolist() == pytest.approx([-0.959, -0.611, 1.134, 1.483, -0.959, 0.436, -0.959, 0.436],
                                                    abs=5e-4)
    # And exactly: r = 0.5 r1 + 2 r2 = [0.5, 1, 3.5, 4 | 0.5, 2.5, 0.5, 2.5]; batch mean 15 / 8, unbiased batch std.
    r = [0.5 * a + 2 * b for a, b in zip(REF_R1, REF_R2)]
    assert r == [0.5, 1.0, 3.5, 4.0, 0.5, 2.5, 0.5, 2.5]
    expected = [(x - 15 / 8) / (_std(r) + 1e-4) for x in r]
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-6)


def test_grpo_global_std_is_the_group_mean_over_the_batch_std():
    res = compute_advantages("grpo_global_std", REF_REWARDS, REF_WEIGHTS, 4, std_floor=0.0, zero_variance_rtol=1e-5,
                             clip=5.0)
    r = [0.5 * a + 2 * b for a, b in zip(REF_R1, REF_R2)]
    sd = _std(r)  # sqrt(14.375 / 7) = 1.43303...
    assert sd == pytest.approx(math.sqrt(14.375 / 7))
    expected = [(x - 2.25) / (sd + 1e-4) for x in r[:4]] + [(x - 1.5) / (sd + 1e-4) for x in r[4:]]
    assert res.advantages.tolist() == pytest.approx(expected, rel=1e-6)
    # Not the per-group std of grpo: the second group's spread (std 1.1547) differs from the batch's.
    grpo = compute_advantages("grpo", REF_REWARDS, REF_WEIGHTS, 4, std_floor=0.0, zero_variance_rtol=1e-5, clip=5.0)
    assert abs(grpo.advantages[5].item() - res.advantages[5].item()) > 0.1


def test_batch_std_types_mask_failures_clip_and_count_flat_groups():
    # Group 0 flat (all 1.0), group 1 varies; sample 6 failed. The batch statistics use the 7 valid samples.
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0], [3.0], [NAN], [9.0]])
    valid = torch.tensor([True] * 6 + [False, True])
    kept = [1.0, 1.0, 1.0, 1.0, 0.0, 3.0, 9.0]
    mean, sd = _mean(kept), _std(kept)
    pp = compute_advantages("reinforcepp", rewards, torch.ones(8, 1), 4, valid=valid, std_floor=0.0,
                            zero_variance_rtol=1e-5, clip=1.0)
    raw = [(x - mean) / (sd + 1e-4) for x in kept]
    expected = [max(-1.0, min(1.0, x)) for x in raw]
    assert pp.advantages.tolist() == pytest.approx(expected[:6] + [0.0] + expected[6:], rel=1e-6)
    assert pp.zero_variance_group_fraction == 0.5  # counted, but reinforcepp keeps its batch-centred signal
    assert pp.advantages[:4].abs().min() > 0.1
    assert pp.clip_fraction == pytest.approx(sum(abs(x) > 1.0 for x in raw) / 7)
    gs = compute_advantages("grpo_global_std", rewards, torch.ones(8, 1), 4, valid=valid, std_floor=0.0,
                            zero_variance_rtol=1e-5, clip=5.0)
    group_mean = _mean([0.0, 3.0, 9.0])
    expected = ([0.0] * 4 + [(x - group_mean) / (sd + 1e-4) for x in (0.0, 3.0)]
                + [0.0, (9.0 - group_mean) / (sd + 1e-4)])
    assert gs.advantages.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert gs.zero_variance_group_fraction == 0.5

"""DiffusionNFT math against hand-worked values and closed forms: the loss on a tiny example, the on-policy gradient
-2 t A~ (x_t - t v - x0) / (w D B), the official old-policy decay schedules and the update old <- d old + (1 - d)
theta, and the flag checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepgen_rl.config import parse_args
from deepgen_rl.rl.nft import nft_kl, nft_loss, old_policy_decay, optimality
from deepgen_rl.trainer.nft import NftOldPolicy


def _t(*values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, len(values))


def test_loss_on_a_hand_worked_example():
    # x0 = [1, 0], x_t = [0.5, 0.5], t = 0.5, v = [0.2, -0.4], v_old = [0, 0.2], beta 0.5, A 2.5, C 5: r = 0.75.
    # v+ = [0.1, -0.1] -> x+ = [0.45, 0.55], |x+ - x0| = [0.55, 0.55]: w+ = 0.55, P = 0.3025 / 0.55 = 0.55.
    # v- = 1.5 v_old - 0.5 v = [-0.1, 0.5] -> x- = [0.55, 0.25], |x- - x0| = [0.45, 0.25]: w- = 0.35,
    # N = (0.2025 + 0.0625) / 2 / 0.35 = 0.378571...; L = 5 (0.75 P + 0.25 N) / 0.5 = 5.0714285...
    out = nft_loss(_t(0.2, -0.4), _t(0.0, 0.2), _t(0.5, 0.5), _t(1.0, 0.0), torch.tensor([0.5]), torch.tensor([2.5]),
                   beta=0.5, adv_clip=5.0)
    assert out.optimality.item() == pytest.approx(0.75)
    assert out.positive.item() == pytest.approx(0.55, rel=1e-6)
    assert out.negative.item() == pytest.approx(0.1325 / 0.35, rel=1e-6)
    assert out.loss.item() == pytest.approx(10 * (0.75 * 0.55 + 0.25 * 0.1325 / 0.35), rel=1e-6)


def test_optimality_clips_the_advantage_then_maps_to_zero_one():
    r = optimality(torch.tensor([-7.0, -5.0, 0.0, 2.5, 9.0]), 5.0)
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_on_policy_gradient_is_the_closed_form(beta):
    # v_old = v (detached): dL/dv = C / beta [r (-2 t beta e / (w D)) + (1 - r)(2 t beta e / (w D))] / B with
    # e = x_t - t v - x0 (both predictions equal it, so w+ = w- = w = mean|e|), and C (1 - 2 r) = -A~:
    # dL/dv = -2 t A~ e / (w D B), whatever beta.
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 4)
    B, D, C = shape[0], 2 * 4 * 4, 5.0
    x0, x_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g).requires_grad_(True)
    t = torch.tensor([0.9, 0.5, 0.2])
    adv = torch.tensor([1.5, -7.0, 0.3])  # -7 is clipped to -5
    out = nft_loss(v, v.detach(), x_t, x0, t, adv, beta=beta, adv_clip=C)
    out.loss.mean().backward()
    tt = t.double().reshape(-1, 1, 1, 1)
    e = x_t.double() - tt * v.detach().double() - x0.double()
    w = e.abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    a_tilde = adv.double().clamp(-C, C).reshape(-1, 1, 1, 1)
    expected = -2 * tt * a_tilde * e / (w * D * B)
    torch.testing.assert_close(v.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_kl_is_the_plain_mean_squared_velocity_difference():
    assert nft_kl(_t(1.0, 2.0), _t(0.0, 0.0)).item() == pytest.approx(2.5)


def test_official_decay_schedules():
    assert [old_policy_decay(s, 1) for s in (0, 100, 400, 1000)] == pytest.approx([0.0, 0.1, 0.4, 0.5])
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 76, 200, 500)] == pytest.approx([0, 0, 0, 0.0075, 0.9375,
                                                                                          0.999])
    assert old_policy_decay(10 ** 6, 0) == 0.0
    with pytest.raises(ValueError, match="--nft_decay_type"):
        old_policy_decay(1, 3)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 1)
        self.frozen.requires_grad_(False)


def test_old_policy_is_a_separate_copy_updated_with_the_schedule():
    model = _Tiny()
    old = NftOldPolicy(model, ["transformer"], decay_type=1, beta=1.0, adv_clip=5.0)
    assert old.rollout_model.frozen is model.frozen  # frozen parts shared, trained ones copied
    start = model.transformer.weight.detach().clone()
    with torch.no_grad():
        model.transformer.weight.add_(1.0)
    assert torch.equal(old.rollout_model.transformer.weight, start)  # training does not move the old policy
    assert old.update(model, applied_steps=100) == pytest.approx(0.1)  # d(100) = 0.1 (type 1)
    torch.testing.assert_close(old.rollout_model.transformer.weight, 0.1 * start + 0.9 * (start + 1.0))
    assert old.update(model, applied_steps=300) == pytest.approx(0.4)  # d(400)
    torch.testing.assert_close(old.rollout_model.transformer.weight,
                               0.4 * (0.1 * start + 0.9 * (start + 1.0)) + 0.6 * (start + 1.0))
    state = old.state_dict()
    assert state["optimizer_steps"] == 400 and set(state["params"]) == {"transformer.weight", "transformer.bias"}


def test_flags_refuse_init_same_noise_and_resolve_its_default(tmp_path):
    base = ["--output_dir", str(tmp_path)]
    assert parse_args(base)[0].init_same_noise is True  # GRPO: the reference's shared group noise
    nft = parse_args(base + ["--atrain_algorithm", "diffusionnft"])[0]
    assert nft.init_same_noise is False and nft.nft_beta == 1.0 and nft.nft_decay_type == 1
    with pytest.raises(ValueError, match="--init_same_noise"):
        parse_args(base + ["--atrain_algorithm", "diffusionnft", "--init_same_noise", "true"])
    with pytest.raises(ValueError, match="--sde_window_size applies to the SDE samplers"):
        parse_args(base + ["--atrain_algorithm", "diffusionnft", "--sde_window_size", "2"])
    for bad, flag in ((["--nft_beta", "0"], "--nft_beta"), (["--nft_decay_type", "5"], "--nft_decay_type"),
                      (["--grpoguard_dt_reweight", "true"], "--grpoguard_dt_reweight")):
        with pytest.raises(ValueError, match=flag):
            parse_args(base + bad)

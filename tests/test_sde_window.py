"""The SDE window (--sde_window_size / --sde_window_range, MixGRPO / Flow-GRPO-Fast): the draws, the windowed
rollout (ODE outside, W + 1 latents kept, ratio 1 inside) and the flags. Stand-in model: no weights, milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepgen_rl.config import GRPOConfig
from deepgen_rl.rl.timesteps import (draw_window_start, num_train_steps, num_window_train_steps,
                                     sample_train_steps, sample_window_train_steps, sde_window_range)
from deepgen_rl.sampling import recompute_step, rollout
from deepgen_rl.trainer.sde_window import draw_sde_window, draw_train_steps
from tests.test_rollout import StandInModel
from tests.tolerances import assert_close_up_to_reordering

pytestmark = pytest.mark.timeout(60)


def _window_rollout(window, sampler="cps_sde", micro=None, steps=6, seed=0):
    return rollout(StandInModel(), ["a red apple", "two cats"], group_size=3, sampler=sampler, eta=1.0,
                   logprob_variant="reference", num_inference_steps=steps, height=64, width=64, cfg_scale=0.0,
                   init_same_noise=True, generator=torch.Generator().manual_seed(seed), micro_batch_size=micro,
                   sde_window=window)


# Two stand-in instances compute the same thing, possibly summing in another order (tests/tolerances.py): per step
# a prompt mean (12 terms) and the log-prob's mean over C x H x W = 256 terms, 6 steps in sequence.
STAND_IN_REDUCTIONS = {"reductions": 12, "longest": 256}


def test_window_covering_every_step_is_the_full_rollout():
    full, covered = _window_rollout(None), _window_rollout((0, 6))
    assert_close_up_to_reordering(covered.latents, full.latents, **STAND_IN_REDUCTIONS)
    assert_close_up_to_reordering(covered.log_probs, full.log_probs, **STAND_IN_REDUCTIONS)
    assert covered.step_offset == 0 and covered.final is None
    assert torch.equal(covered.final_latents, covered.latents[:, -1])  # the same tensor, not a recomputation
    assert_close_up_to_reordering(covered.final_latents, full.latents[:, -1], **STAND_IN_REDUCTIONS)


@pytest.mark.parametrize("micro", [None, 4])
def test_window_keeps_w_plus_one_latents_runs_ode_outside_and_has_ratio_one_inside(micro):
    start, end = 2, 4
    traj = _window_rollout((start, end), micro=micro)
    assert traj.latents.shape == (6, end - start + 1, 4, 8, 8)  # W + 1 slots, not T + 1
    assert list(traj.recorded_steps) == [2, 3]
    # Log-probs only inside the window (NaN marks the ODE steps, which have none).
    assert torch.isfinite(traj.log_probs[:, start:end]).all()
    assert torch.isnan(traj.log_probs[:, :start]).all() and torch.isnan(traj.log_probs[:, end:]).all()
    # Before the window the trajectory is the ODE's: an ODE rollout from the same initial noise reaches the same x_2.
    ode = _window_rollout(None, sampler="ode", micro=micro)
    assert torch.allclose(traj.latents[:, 0], ode.latents[:, start], atol=1e-6)
    # After the window the ODE runs from x_4 to x_T (no noise): x_T differs from the pure ODE's (the window's noise),
    # and x_T is held apart from the window's slots.
    assert traj.final is not None and not torch.allclose(traj.final, ode.latents[:, -1])
    with torch.no_grad():
        for step in traj.recorded_steps:  # first chunk's ratio 1: recomputed == recorded (another instance)
            again = recompute_step(StandInModel(), traj, step, slice(None))
            assert_close_up_to_reordering(again.log_prob, traj.log_probs[:, step], **STAND_IN_REDUCTIONS)
    with pytest.raises(IndexError, match="outside the recorded steps 2..3"):
        traj.transition(1)
    traj.release_final()
    with pytest.raises(RuntimeError, match="released"):
        traj.final_latents


def test_ode_tail_of_window_matches_an_euler_step_by_hand():
    # Window (0, 1) on T = 3: step 0 SDE, steps 1 and 2 Euler: x' = x + (s' - s) v, v = the stand-in's velocity.
    traj = _window_rollout((0, 1), steps=3)
    model = StandInModel()
    sigmas = traj.sigmas
    x = traj.latents[:, 1].clone()
    cond = traj.conditioning
    with torch.no_grad():
        for i in (1, 2):
            v = model.predict_velocity(x, sigmas[i].expand(x.shape[0]), cond.prompt_embeds, cond.pooled)
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    assert torch.allclose(traj.final, x, atol=1e-6)


def test_window_draws():
    # W = T: the window's trained steps are the full run's, draw for draw.
    for seed in range(5):
        full = sample_train_steps(6, 0.6, torch.Generator().manual_seed(seed))
        count = num_window_train_steps(6, 6, 0.6, range_end=6)
        assert count == num_train_steps(6, 0.6)
        assert sample_window_train_steps(0, 6, 6, count, torch.Generator().manual_seed(seed)) == full
    # The start is uniform over [a, b - W] (each value reached, none outside), trained steps inside the window.
    starts = set()
    for seed in range(200):
        start = draw_window_start(3, 10, 4, torch.Generator().manual_seed(seed))
        starts.add(start)
        steps = sample_window_train_steps(start, 4, 50, 2, torch.Generator().manual_seed(seed))
        assert len(steps) == 2 and all(start <= s < start + 4 for s in steps)
    assert starts == {3, 4, 5, 6}
    # A window holding the last step never trains it.
    assert sample_window_train_steps(4, 2, 6, 1, torch.Generator().manual_seed(0)) == [4]
    assert num_window_train_steps(50, 2, 0.6, range_end=50) == 1 and num_window_train_steps(50, 2, 1.0, 50) == 1
    assert num_window_train_steps(50, 2, 1.0, range_end=40) == 2  # --timestep_fraction 1: all W


def test_trainer_draws_are_shared_by_every_rank_and_lie_in_the_window():
    # The draws take the seed and the step only (no rank): every rank gets the same window and steps.
    args = SimpleNamespace(sde_window_size=3, sde_window_range="1,9", num_inference_steps=10, seed=7,
                           timestep_fraction=1.0, num_train_timesteps=3)
    for step in range(20):
        window = draw_sde_window(args, step)
        assert window == draw_sde_window(args, step) and 1 <= window[0] and window[1] <= 9
        steps = draw_train_steps(args, window, step)
        assert steps == sorted(set(steps)) and len(steps) == 3 and all(window[0] <= s < window[1] for s in steps)
    assert draw_sde_window(SimpleNamespace(sde_window_size=0), 0) is None


@pytest.mark.parametrize("flags, match", [
    ({"sde_window_size": 51}, "--sde_window_size must be in 1..--num_inference_steps"),
    ({"sde_window_size": 4, "sde_window_range": "10"}, "--sde_window_range must be two step indices"),
    ({"sde_window_size": 4, "sde_window_range": "10,12"}, "b - a >= --sde_window_size"),
    ({"sde_window_size": 1}, "may draw only the last step"),
])
def test_window_flags_are_checked(flags, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(output_dir=str(tmp_path), report_to="none", **flags)


def test_window_sets_the_number_of_trained_steps(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), report_to="none", sde_window_size=2, sde_window_range="0,25",
                        timestep_fraction=1.0)
    assert config.num_train_timesteps == 2
    assert sde_window_range(50, 2, None) == (0, 50)


def test_memory_estimate_keeps_w_plus_one_slots_and_x_t():
    from deepgen_rl.estimate_memory import rollout_storage_bytes

    sizes = (2, 50, (16, 64, 64), 10, 8, 4, 512, 512, 2)  # N, T, latent, tokens, widths, image, bf16
    slot = 2 * 16 * 64 * 64 * 4  # one latent of N = 2 samples, fp32
    assert rollout_storage_bytes(*sizes) - rollout_storage_bytes(*sizes, window=2) == (51 - (2 + 2)) * slot

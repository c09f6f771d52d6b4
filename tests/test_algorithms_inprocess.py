"""GRPO-Guard and DiffusionNFT in the real trainer (one process, DeepSpeed ZeRO-2 on CPU; one ZeRO-3 run): every
optimizer-step schedule, the NFT rollout by the separate old policy (groups of distinct images), its update rule
after each step, and an exact resume of NFT with the EMA on (old policy and EMA restored from the checkpoint)."""

from __future__ import annotations

import math

import pytest
import torch

from deepgen_rl.rl.nft import old_policy_decay
from tests.test_checkpoint_safety import _build_zero3
from tests.test_trainer_inprocess import build, digest, history


# The schedule runs train 2 of the 6 steps without SFT-aux: cheaper, and still several optimizer steps per rollout
# under the reference and per_timestep schedules.
SHORT = dict(timestep_fraction=0.34, sftaux_coef=0.0)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _old(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in trainer.nft._old_params().items()}


def _train_one_step(trainer):
    try:
        before = _trained(trainer.model)
        trainer.train()
        return before, _trained(trainer.model), history(trainer)[1]
    finally:
        trainer.close()


@pytest.mark.parametrize("schedule", ["reference", "per_timestep", "per_rollout"])
def test_grpoguard_trains_under_every_schedule(process_group, tiny_paths, tmp_path, schedule):
    trainer = build(tiny_paths, tmp_path, max_steps=1, atrain_algorithm="grpoguard", optimizer_step_schedule=schedule,
                    **SHORT,
                    grpoguard_dt_reweight=schedule == "per_timestep", clip_range_low=-0.01, clip_range_high=0.02)
    plan = trainer.plan
    before, after, record = _train_one_step(trainer)
    assert record["train/optimizer_steps"] == plan.optimizer_steps_per_rollout and record["train/step_applied"] == 1
    assert record["policy/first_chunk_ratio_max_dev"] == 0.0  # rho == 0 exactly before the first optimizer step
    assert math.isfinite(record["loss/policy"])
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_grpoguard_inside_an_sde_window_keeps_the_window_means(process_group, tiny_paths, tmp_path):
    # The rollout keeps mean_old only for the W window steps, indexed from the window's start (step_offset).
    trainer = build(tiny_paths, tmp_path, max_steps=1, atrain_algorithm="grpoguard", optimizer_step_schedule="per_rollout",
                    sftaux_coef=0.0, sde_window_size=2, timestep_fraction=1.0)
    try:
        trajectory = trainer.rollout_phase(0).trajectory
        assert trajectory.means.shape[1] == 2 == trajectory.latents.shape[1] - 1
        start = trajectory.step_offset
        for j in range(2):  # mean_old is the Euler-Maruyama mean of the recorded step: x' = mean + std * eps
            assert torch.isfinite(trajectory.means[:, j]).all()
            assert not torch.equal(trajectory.means[:, j], trajectory.latents[:, j + 1])
        assert torch.isfinite(trajectory.log_probs[:, start:start + 2]).all()
    finally:
        trainer.close()
    trainer = build(tiny_paths, tmp_path / "train", max_steps=1, atrain_algorithm="grpoguard",
                    optimizer_step_schedule="per_rollout", sftaux_coef=0.0, sde_window_size=2, timestep_fraction=1.0)
    before, after, record = _train_one_step(trainer)
    assert record["policy/first_chunk_ratio_max_dev"] == 0.0 and math.isfinite(record["loss/policy"])
    assert all(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("schedule", ["reference", "per_rollout"])  # per_timestep: the resume test below
def test_diffusionnft_trains_under_every_schedule_and_updates_the_old_policy(process_group, tiny_paths, tmp_path,
                                                                             schedule):
    trainer = build(tiny_paths, tmp_path, max_steps=1, atrain_algorithm="diffusionnft",
                    optimizer_step_schedule=schedule, nft_decay_type=1, beta=1e-4, **SHORT)
    plan = trainer.plan
    start_old = _old(trainer)
    before, after, record = _train_one_step(trainer)
    steps = plan.optimizer_steps_per_rollout
    assert record["train/optimizer_steps"] == steps and record["train/step_applied"] == 1
    assert math.isfinite(record["loss/policy"])
    assert record["loss/kl"] > 0 if steps > 1 else record["loss/kl"] == 0  # one step: the policy is the reference
    assert 0.0 < record["nft/optimality"] < 1.0
    assert all(not torch.equal(before[n], after[n]) for n in before)
    # old <- d old + (1 - d) theta with d = min(0.001 s, 0.5), s the optimizer steps taken.
    decay = old_policy_decay(steps, 1)
    assert record["nft/old_decay"] == pytest.approx(decay)
    old = _old(trainer)
    for name in before:
        torch.testing.assert_close(old[name], decay * start_old[name] + (1 - decay) * after[name])


def test_nft_rollout_is_the_old_policys_ode_with_distinct_images_per_group(process_group, tiny_paths, tmp_path):
    trainer = build(tiny_paths, tmp_path, max_steps=1, atrain_algorithm="diffusionnft")
    try:
        sampler_state = trainer.prompt_sampler.state_dict()
        first = trainer.rollout_phase(0).trajectory
        assert first.log_probs is None  # ODE: nothing to recompute
        final = first.latents[:, -1].flatten(1)
        G = trainer.args.rollout_n
        for group in range(first.num_samples // G):  # independent initial noise: every pair of a group differs
            rows = final[group * G:(group + 1) * G]
            assert torch.cdist(rows, rows).add(torch.eye(G) * 1e9).min() > 1e-3
        # The OLD policy rolls out: moving the live weights changes nothing until the old policy is updated.
        with torch.no_grad():
            for p in trainer.model.transformer.parameters():
                p.add_(0.05)
        trainer.prompt_sampler.load_state_dict(sampler_state)  # the same prompts and seed again
        torch.testing.assert_close(trainer.rollout_phase(0).trajectory.latents, first.latents, rtol=0, atol=0)
    finally:
        trainer.close()


def test_nft_resume_restores_the_old_policy_and_the_ema_exactly(process_group, tiny_paths, tmp_path):
    # --ema_device cpu: the host-copy EMA through a trainer run (test_ema.py's trainer run has the sharded one).
    flags = dict(atrain_algorithm="diffusionnft", nft_decay_type=2, ema_decay=0.5, ema_device="cpu", max_steps=2,
                 optimizer_step_schedule="per_timestep", save_strategy="steps", save_steps=1, **SHORT)
    straight = build(tiny_paths, tmp_path / "a", **flags)
    try:
        straight.train()
        expected = (digest(straight.model), _old(straight), dict(straight.ema.shadow), history(straight)[2])
    finally:
        straight.close()
    assert (tmp_path / "a" / "checkpoint-1" / "nft_old_policy.pt").is_file()
    resumed = build(tiny_paths, tmp_path / "b", **flags)
    try:
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
        assert digest(resumed.model) == expected[0]
        old = _old(resumed)
        assert all(torch.equal(old[n], expected[1][n]) for n in old)
        assert all(torch.equal(resumed.ema.shadow[n], expected[2][n]) for n in expected[2])
        assert history(resumed)[2]["loss/policy"] == expected[3]["loss/policy"]
        assert resumed.nft.optimizer_steps == 2 * resumed.plan.optimizer_steps_per_rollout
        assert expected[3]["train/optimizer_steps"] == resumed.plan.optimizer_steps_per_rollout > 1
    finally:
        resumed.close()


def test_nft_under_zero3_gathers_the_weights_for_the_old_policy_update(process_group, tiny_paths, tmp_path):
    from tests.trainer_utils import param_digests

    trainer = _build_zero3(tiny_paths, tmp_path, max_steps=1, atrain_algorithm="diffusionnft", nft_decay_type=0,
                           optimizer_step_schedule="per_rollout", learning_rate=1e-3, **SHORT)
    try:
        trainer.train()
        live = param_digests(trainer.model)  # gathered whole
        old = {n: p for n, p in trainer.nft._old_params().items()}
        import hashlib
        for name, param in old.items():  # decay type 0: old == theta after the update
            data = param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            assert hashlib.sha256(data).hexdigest() == live[name]["sha256"], name
    finally:
        trainer.close()

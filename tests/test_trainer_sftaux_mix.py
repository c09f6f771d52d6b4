"""The trainer's per-backward weights realise the convex SFT-aux mix of docs/algorithms.md#sft-aux:

    grad = (1 - lambda) grad L_grpo + lambda grad L_sft,

with L_grpo the rank's mean over (drawn steps x valid samples). Checked on the real ``train_phase`` with a stand-in
DeepSpeed engine (plain ``loss.backward()``, so the accumulated gradient is exactly the weighted sum) and
stand-in objectives whose per-sample losses are known functions of one scalar parameter.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepgen_rl.rl import AdvantageResult
from deepgen_rl.trainer import grpo_trainer
from deepgen_rl.trainer.batching import plan_batches
from deepgen_rl.trainer.objective import ChunkObjective

N, T, MICRO = 8, 10, 3  # samples, denoising steps, training micro-batch (uneven chunks 3 + 3 + 2)
VALID = torch.tensor([True, True, False, True, True, True, False, True])


class StandInEngine:
    """What ``train_phase`` needs of a DeepSpeed engine; backward is plain autograd (no loss scaling)."""

    def __init__(self) -> None:
        self.boundaries: list[bool] = []  # what the trainer declared before each backward

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.boundaries.append(boundary)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False  # the trainer weights each backward itself
        loss.backward()

    def step(self):
        pass

    def get_lr(self):
        return [0.0]

    def was_step_applied(self):
        return self.boundaries[-1]

    def get_global_grad_norm(self):
        return 0.0


def per_sample_loss(w: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
    """l_{s,i}(w) = (s + 1) (i + 1) w + (i - 3) w^2: distinct per step and per sample. -> [len(rows)]"""
    i = rows.to(torch.float64)
    return (step + 1) * (i + 1) * w + (i - 3) * w * w


def sft_loss(w: torch.Tensor) -> torch.Tensor:
    return 7.0 * w ** 3 - 2.0 * w


@pytest.mark.parametrize("coef", [0.25, 1e-4])
def test_backward_weights_give_the_convex_mix_of_gradients(monkeypatch, coef):
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    drawn: list[int] = []

    def chunk_objective(model, trajectory, step, rows, *, advantages, valid, **_):
        drawn.append(step)
        index = torch.arange(N)[rows]
        mask = valid[rows]
        loss = (per_sample_loss(w, step, index) * mask).sum() / mask.sum().clamp_min(1)  # the chunk's masked mean
        return ChunkObjective(loss=loss, policy_term=loss, kl_term=None, policy_loss=float(loss.detach()), kl=0.0,
                              clip_fraction=0.0, ratio_mean=1.0, ratio_max_dev=0.0, num_valid=int(mask.sum()))

    monkeypatch.setattr(grpo_trainer, "policy_chunk_objective", chunk_objective)
    monkeypatch.setattr(grpo_trainer, "sftaux_objective", lambda *args, **kwargs: sft_loss(w))

    # The convex mix is the per_rollout schedule's one accumulated gradient (the other schedules step in between).
    args = SimpleNamespace(seed=0, num_inference_steps=T, timestep_fraction=0.3, rollout_n=4, rollout_cfg_scale=0.0,
                           sftaux_coef=coef, sftaux_global_batch_size=2, beta=0.0,
                           optimizer_step_schedule="per_rollout",
                           clip_range=1e-4)
    trainer = grpo_trainer.DeepGenGRPOTrainer.__new__(grpo_trainer.DeepGenGRPOTrainer)
    plan = plan_batches(global_batch_size=N, rollout_n=4, world_size=1, atrain_micro_batch_size=MICRO,
                        num_train_timesteps=3, sftaux_enabled=True, optimizer_step_schedule="per_rollout",
                        actor_update_steps=1, kl_step=False)
    sft_batch = SimpleNamespace(images=torch.zeros(2, 3, 8, 8), captions=["a", "b"])
    trainer.__dict__.update(
        args=args, plan=plan, device=torch.device("cpu"), reference=None, text_trains=False, objective=None,
        engine=StandInEngine(), model=torch.nn.Module(), _stop=None,
        sftaux_sampler=SimpleNamespace(sample=lambda first, count: sft_batch), rank=0, world_size=1,
        state=SimpleNamespace(global_step=0), ema=None, nft=None, optimizer_steps_taken=0,
        optimizer_steps_applied=0, _last_grad_norm=None, kl_forward="separate")
    batch = grpo_trainer.RolloutBatch(samples=[], trajectory=SimpleNamespace(num_samples=N))
    advantages = AdvantageResult(advantages=torch.zeros(N), valid=VALID, zero_variance_group_fraction=0.0,
                                 clip_fraction=0.0, num_valid=int(VALID.sum()), num_groups=2)

    metrics = trainer.train_phase(batch, advantages, step=0)

    steps = sorted(set(drawn))
    assert len(steps) == 3 and len(drawn) == 3 * 3  # int(10 x 0.3) steps x 3 chunks
    assert metrics["train/step_applied"] == 1.0
    # per_rollout: one accumulation over all 9 chunks + SFT-aux, ended by the last backward only.
    assert trainer.engine.boundaries == [False] * 9 + [True]
    # Independently: L_grpo = mean over drawn steps and valid samples; the mix, differentiated by autograd.
    w_ref = w.detach().clone().requires_grad_(True)
    valid_rows = torch.nonzero(VALID).flatten()
    l_grpo = torch.stack([per_sample_loss(w_ref, s, valid_rows) for s in steps]).mean()
    ((1 - coef) * l_grpo + coef * sft_loss(w_ref)).backward()
    assert w.grad.item() == pytest.approx(w_ref.grad.item(), rel=1e-12)
    # Not just any weighting: with the SFT term at full weight or left out the gradient differs.
    (l_grpo_grad,) = torch.autograd.grad(torch.stack([per_sample_loss(w_ref, s, valid_rows) for s in steps]).mean(),
                                         w_ref)
    assert w.grad.item() != pytest.approx(l_grpo_grad.item(), rel=1e-9)

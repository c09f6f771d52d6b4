"""--optimizer_step_schedule and --atrain_num_actor_update_steps on the in-process trainer (one-rank DeepSpeed
ZeRO-2 on CPU, the tiny run: 8 samples per rank in one chunk, 3 of 6 steps trained, beta > 0, SFT-aux on).

Per GRPO step the optimizer (and the LR scheduler) must step exactly as often as the schedule's formula says
(docs/algorithms.md#optimizer-steps-per-rollout: reference = 2 x drawn steps x updates + 1 with beta > 0 and SFT-aux),
the first
chunk's ratio is exactly 1, later policy steps see moved weights under `reference`, and actor updates partition
the samples.
"""

from __future__ import annotations

import pytest

from deepgen_rl.trainer import grpo_trainer
from tests.test_trainer_inprocess import build

DRAWN = 3  # int(6 x 0.6) of the tiny run
LR = 1e-3  # build()'s learning rate, linear decay to 0 over all optimizer steps, no warm-up


def _one_step(trainer):
    try:
        metrics, _, _ = trainer.training_step()
        return metrics, list(trainer.step_records)
    finally:
        trainer.close()


@pytest.mark.parametrize("schedule, kinds", [
    ("reference", ["policy", "kl"] * DRAWN + ["sft"]),
    ("per_timestep", ["policy+kl"] * DRAWN + ["sft"]),
    ("per_rollout", ["rollout"]),
])
def test_optimizer_and_lr_scheduler_steps_follow_the_schedule(process_group, tiny_paths, tmp_path, schedule, kinds):
    trainer = build(tiny_paths, tmp_path, max_steps=2, optimizer_step_schedule=schedule)
    engine = trainer.engine
    before_engine, before_scheduler = engine.global_steps, engine.lr_scheduler.last_epoch
    metrics, records = _one_step(trainer)
    steps = len(kinds)
    assert [r.kind for r in records] == kinds
    assert metrics["train/optimizer_steps"] == steps and all(r.applied for r in records)
    assert engine.global_steps - before_engine == steps
    assert engine.lr_scheduler.last_epoch - before_scheduler == steps
    # The schedule spans max_steps x steps optimizer steps: step k ran at lr (1 - k / (2 steps)) x LR.
    assert [r.lr for r in records] == pytest.approx([LR * (1 - k / (2 * steps)) for k in range(steps)], rel=1e-9)
    assert metrics["policy/first_chunk_ratio_max_dev"] <= 1e-6
    if schedule == "reference":
        # The first policy step saw the rollout's weights (ratio 1); the next one saw weights two AdamW steps on.
        assert records[0].ratio_max_dev <= 1e-6 and records[2].ratio_max_dev > 1e-4
        assert metrics["policy/ratio_max_dev"] == pytest.approx(max(r.ratio_max_dev for r in records
                                                                    if r.kind == "policy"))


def test_actor_updates_partition_the_samples(process_group, tiny_paths, tmp_path, monkeypatch):
    # 8 samples, 3 updates -> 3 disjoint parts of 2 (2 samples dropped), each trained over the same drawn steps.
    trainer = build(tiny_paths, tmp_path, max_steps=2, optimizer_step_schedule="per_timestep",
                    atrain_num_actor_update_steps=3)
    seen = []
    real_objective = grpo_trainer.policy_chunk_objective

    def recording(model, trajectory, step, rows, **kwargs):
        seen.append((step, tuple(int(r) for r in rows)))
        return real_objective(model, trajectory, step, rows, **kwargs)

    monkeypatch.setattr(grpo_trainer, "policy_chunk_objective", recording)
    metrics, records = _one_step(trainer)
    assert len(seen) == 3 * DRAWN and len(records) == 3 * DRAWN + 1 == metrics["train/optimizer_steps"]
    parts = [seen[k * DRAWN][1] for k in range(3)]
    assert all(len(part) == 2 for part in parts)
    trained = [row for part in parts for row in part]
    assert len(set(trained)) == 6 and set(trained) <= set(range(8))  # each at most once per pass
    assert metrics["train/actor_dropped_samples"] == 2.0
    drawn = [step for step, _ in seen[:DRAWN]]
    assert drawn == sorted(drawn) and len(set(drawn)) == DRAWN
    for k, part in enumerate(parts):  # each part runs over every drawn step, in order, before the next part
        assert seen[k * DRAWN:(k + 1) * DRAWN] == [(step, part) for step in drawn]

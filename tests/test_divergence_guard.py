"""Issue 30 item 1: a diverged run stops, names the cause and the last good checkpoint, and never scores or saves
NaN. The unit tests are model-free; one in-process run (the issue's probe: --learning_rate 1e10) goes through the
entry point."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepgen_rl import grpo_deepgen
from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.reward_step import RewardStep
from deepgen_rl.sampling.rollout import decode_images
from deepgen_rl.trainer import checkpointing
from deepgen_rl.trainer.divergence import SkipBudget, check_trained_weights
from tests.test_run_folder import fake_checkpoint
from tests.trainer_utils import ZERO2, tiny_run_flags


class MeanPixel:
    """r = mean 8-bit pixel / 255; remembers how many images each call got."""

    name = "jpeg_compressibility"
    score_range = (0.0, 1.0)
    service = "in-process test reward"

    def __init__(self):
        self.calls = []

    def check_ready(self):
        pass

    def score(self, images, prompts, group_ids):
        self.calls.append(len(images))
        return RewardScores(values=[float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images],
                            errors=[None] * len(images))

    def close(self):
        pass


def test_a_nan_or_inf_image_fails_its_rewards_and_is_never_scored():
    images = torch.full((4, 3, 8, 8), 0.5)
    images[1, 0, 2, 3] = float("nan")  # black after the old clamp-and-round: it scored 0.0
    images[3] = float("inf")  # white: it scored 1.0
    reward = MeanPixel()
    step = RewardStep({"jpeg_compressibility": reward})
    try:
        weights = [{"jpeg_compressibility": 1.0}] * 4
        for batch in (step.score(images, ["p"] * 4, weights, [0, 0, 1, 1]),
                      step.submit(images, ["p"] * 4, weights, [0, 0, 1, 1]).result()):
            assert batch.failed.tolist() == [False, True, False, True]
            assert batch.failure_counts == {"jpeg_compressibility": 2}
            assert batch.metrics["nonfinite_images"] == 2.0
            assert torch.isnan(batch.scores[[1, 3], 0]).all()
            assert batch.scores[[0, 2], 0].tolist() == pytest.approx([128 / 255] * 2)
            assert all("NaN/inf" in f.message for f in batch.failures)
        assert reward.calls == [2, 2]  # the diverged samples never reached the reward
    finally:
        step.close()


def test_decode_turns_a_diverged_latent_into_a_nan_image():
    # A decoder that maps a latent to its tanh (finite for finite input) and inf to +-1 once clamped: the old
    # decode_images returned a white, finite image for the inf latent.
    model = SimpleNamespace(dtype=torch.float32,
                            decode_latents=lambda z: z[:, :1].expand(-1, 3, -1, -1) * 2.0)
    latents = torch.full((3, 4, 2, 2), 0.25)
    latents[1, 2, 0, 0] = float("inf")  # a channel the decoder does not even read
    latents[2, 0, 1, 1] = float("inf")  # decodes to inf, which the clamp turned into 1.0
    images = decode_images(model, latents, micro_batch_size=2)
    assert torch.isnan(images[1]).all() and torch.isnan(images[2]).all()
    assert torch.equal(images[0], torch.full((3, 2, 2), 0.5))


def _step(applied=0, skipped=0, nonfinite_losses=0, nonfinite_images=0):
    return {"train/optimizer_steps": float(applied), "train/optimizer_steps_skipped": float(skipped),
            "train/nonfinite_losses": float(nonfinite_losses), "reward/nonfinite_images": float(nonfinite_images)}


def test_skip_budget_counts_consecutive_update_skips_and_names_each_cause():
    budget = SkipBudget(3)
    assert budget.update(1, _step(applied=2)) is None
    assert budget.update(2, _step(skipped=2)) is None  # one overflow: go on
    assert budget.update(3, _step(applied=1, skipped=1)) is None  # an applied step ends the streak
    assert budget.first_skipped_step is None
    assert budget.update(4, _step(skipped=2, nonfinite_losses=3)) is None
    assert budget.update(5, _step()) is None  # every reward failed (the reward budget's business): neutral
    assert budget.update(6, _step(skipped=1)) is None
    reason = budget.update(7, _step(nonfinite_images=8))
    assert budget.first_skipped_step == 4
    assert reason.startswith("3 consecutive steps applied no optimizer step (--max_skipped_steps 3)")
    assert "step 4: NaN/inf loss in 3 chunk(s), 2 optimizer step(s) skipped" in reason
    assert "step 6: gradient overflow" in reason and "OVERFLOW! Skipping step" in reason
    assert "step 7: 8 sample(s) with NaN/inf latents or images" in reason
    assert SkipBudget(0).update(1, _step(skipped=1)) is None  # 0: never stop


def test_weight_check_finds_nan_in_trained_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.fill_(2.0)
    check = check_trained_weights(model, torch.device("cpu"))
    assert check.finite and check.norm == pytest.approx((6 * 1.0 + 2 * 4.0) ** 0.5)  # sqrt(sum of squares)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")  # frozen: not saved, not checked
    assert check_trained_weights(model, torch.device("cpu")).finite
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    check = check_trained_weights(model, torch.device("cpu"))
    assert not check.finite and check.bad == ("0.bias",)


def test_latest_skips_a_checkpoint_marked_non_finite(tmp_path, caplog):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    state = checkpointing.TrainerState(global_step=2)
    state.weights_finite = False
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(state.to_json())
    with caplog.at_level(logging.WARNING):
        assert checkpointing.newest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert "records that its trained weights held NaN/inf when saved" in caplog.text


@pytest.mark.timeout(300)
def test_learning_rate_1e10_stops_with_exit_4_and_latest_resumes_before_the_divergence(
        process_group, tiny_paths, tmp_path, caplog, monkeypatch):
    for name, value in grpo_deepgen.TRACKER_MODE_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    flags = tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO2), learning_rate=1e10, max_steps=6,
                           save_strategy="steps", save_steps=1, max_skipped_steps=2, sftaux_coef=0, beta=0)
    with caplog.at_level(logging.INFO):
        code = grpo_deepgen.main(flags)
    assert code == grpo_deepgen.EXIT_DIVERGED == 4
    stops = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "training stopped" in
             r.getMessage()]
    assert len(stops) == 1, caplog.text
    message = stops[0]
    # Step 1 applied one huge update; from step 2 on every rollout is NaN: never scored, counted, then stopped.
    assert "training diverged: 2 consecutive steps applied no optimizer step (--max_skipped_steps 2)" in message
    assert "step 2: 8 sample(s) with NaN/inf latents or images" in message
    assert f"the last checkpoint saved before it is {out / 'checkpoint-1'}" in message
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3]  # it stopped at once, not at --max_steps 6
    assert records[2]["reward/nonfinite_images"] == 8.0 and records[2]["reward/failed_samples"] == 8.0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stopped_because"].startswith("training diverged") and summary["failed_samples"] == {
        "jpeg_compressibility": 16}
    # The checkpoints of the failing steps were moved aside (kept): 'latest' resumes the one the message names.
    assert checkpointing.newest_good_checkpoint(out) == out / "checkpoint-1"
    moved = [p for p in out.iterdir() if p.name.startswith("diverged-after-step-1-")]
    assert len(moved) == 1 and sorted(p.name for p in moved[0].glob("checkpoint-*")) == ["checkpoint-2",
                                                                                         "checkpoint-3"]
    assert str(moved[0]) in message
    beat = json.loads((out / "heartbeats" / "rank-0.json").read_text())  # the run's heartbeat: its last phase
    assert beat["rank"] == 0 and beat["step"] == 3 and beat["phase"] == "save"  # step 3 was saved, then stopped
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["weights_finite"] is True and state["trained_weight_norm"] > 0


def test_guard_flags_parse_with_their_defaults_and_refuse_negative_values():
    from deepgen_rl.config import parse_args

    args = parse_args(["--output_dir", "out", "--overwrite_output_dir"])[0]
    assert (args.overwrite_output_dir, args.max_skipped_steps, args.stall_report_s) == (True, 3, 600.0)
    for flag in ("--max_skipped_steps", "--stall_report_s"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 0"):
            parse_args(["--output_dir", "out", flag, "-1"])

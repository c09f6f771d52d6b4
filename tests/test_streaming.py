"""Streamed rewards (--stream_rewards, default on) against serial ones: the same tiny-model GRPO step, scored by a
real stand-in reward server on 127.0.0.1 (our OCR contract; score = mean brightness / 255), gives the same images,
rewards, failures, advantages and losses. The first micro-batch's group fails (a per-item server error) and the
others hit a server that answers each request only after 1.5 s, far slower than a tiny micro-batch's rollout."""

from __future__ import annotations

import pytest
import torch
from PIL import ImageStat

from deepgen_rl.data import PromptSample
from deepgen_rl.rewards.base import RewardScores
from deepgen_rl.rewards.http_utils import RetryPolicy
from deepgen_rl.rewards.ocr_client import OcrRewardClient
from deepgen_rl.rewards.reward_merge import merge_reward_batches
from deepgen_rl.rewards.reward_step import RewardStep, images_to_pil
from deepgen_rl.trainer.streaming import reward_chunks
from tests.reward_servers import fake_server
from tests.test_trainer_inprocess import build

pytestmark = pytest.mark.timeout(600)

# 3 prompts x rollout_n 4 = 12 images; rollout micro-batches of 4 = one group each, so 3 streamed chunks.
PROMPTS = ("a shop sign ITEMERR", "a SLOW red ball", "a SLOW blue cube")
REWARD = "jpeg_compressibility"  # the quick-start dataset's reward name, served here by the stand-in OCR server


class FixedPrompts:
    """The prompt sampler's ``sample``: always PROMPTS (so the failing group is the first micro-batch's)."""

    def sample(self, count):
        return [PromptSample(prompt, "quickstart", {REWARD: 1.0}, i) for i, prompt in enumerate(PROMPTS[:count])]


def _one_step(tiny_paths, out, url, stream: bool) -> dict:
    # With an SDE window (steps 1..4 of 6 hold it) both paths decode x_T kept outside the window's slots.
    trainer = build(tiny_paths, out, max_steps=1, global_batch_size=12, rollout_micro_batch_size=4,
                    optimizer_step_schedule="per_rollout", stream_rewards=stream, sde_window_size=3,
                    sde_window_range="1,5", timestep_fraction=1.0)
    trainer.reward_step = RewardStep({REWARD: OcrRewardClient(
        url, RetryPolicy(timeout_s=30.0, max_retries=1, backoff_s=0.01), max_concurrency=4, request_batch_size=2,
        health_timeout_s=5.0)})
    trainer.prompt_sampler = FixedPrompts()
    captured, submitted = {}, []
    advantage_phase, submit = trainer.advantage_phase, trainer.reward_step.submit

    def capture_advantages(rewards):
        captured["advantages"], metrics = advantage_phase(rewards)
        return captured["advantages"], metrics

    def record_submit(images, prompts, *rest):
        submitted.append(list(prompts))  # called from the rollout's micro-batch callback
        return submit(images, prompts, *rest)

    trained = []
    train_timestep = trainer._train_timestep

    def record_timestep(ctx, step_index, *rest, **kwargs):
        trained.append(step_index)
        return train_timestep(ctx, step_index, *rest, **kwargs)

    trainer.advantage_phase, trainer.reward_step.submit = capture_advantages, record_submit
    trainer._train_timestep = record_timestep
    try:
        metrics, batch, rewards = trainer.training_step()
        phases = set(trainer.timer.seconds)
    finally:
        trainer.close()
    return {"metrics": metrics, "images": batch.images, "rewards": rewards, "advantages": captured["advantages"],
            "submitted": submitted, "phases": phases, "window": batch.sde_window, "trained": trained,
            "latents_shape": tuple(batch.trajectory.latents.shape), "final": batch.trajectory.final}


@pytest.fixture(scope="module")
def streamed_and_serial(process_group, tiny_paths, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fake_server("--slow-seconds", "1.5") as server:
            streamed = _one_step(tiny_paths, tmp_path_factory.mktemp("streamed"), server.url, stream=True)
            serial = _one_step(tiny_paths, tmp_path_factory.mktemp("serial"), server.url, stream=False)
    finally:
        torch.set_num_threads(threads)
    return streamed, serial


def test_streamed_step_equals_serial_step(streamed_and_serial):
    streamed, serial = streamed_and_serial
    assert torch.equal(streamed["images"], serial["images"])
    a, b = streamed["rewards"], serial["rewards"]
    assert torch.equal(a.scores.nan_to_num(-1.0), b.scores.nan_to_num(-1.0)) and torch.equal(a.failed, b.failed)
    assert a.failure_counts == b.failure_counts
    assert [(f.sample, f.reward, f.message) for f in a.failures] == [(f.sample, f.reward, f.message) for f in b.failures]
    assert torch.equal(streamed["advantages"].advantages, serial["advantages"].advantages)
    assert torch.equal(streamed["advantages"].valid, serial["advantages"].valid)
    # Every logged figure but timings: rewards, failures, requests, advantage stats, losses, grad norm, ratios.
    keys = {k for k in serial["metrics"] if "seconds" not in k}
    assert keys == {k for k in streamed["metrics"] if "seconds" not in k}
    assert "loss/policy" in keys and "train/grad_norm" in keys and "reward/jpeg_compressibility/requests" in keys
    for key in sorted(keys):
        assert streamed["metrics"][key] == serial["metrics"][key] or (
            streamed["metrics"][key] != streamed["metrics"][key] and serial["metrics"][key] != serial["metrics"][key]
        ), key


def test_streaming_hands_each_group_over_as_its_micro_batch_finishes(streamed_and_serial):
    streamed, serial = streamed_and_serial
    assert streamed["submitted"] == [[prompt] * 4 for prompt in PROMPTS] and serial["submitted"] == []
    assert {"rollout", "reward_wait"} <= streamed["phases"] and "decode" not in streamed["phases"]
    assert {"rollout", "decode", "rewards"} <= serial["phases"] and "reward_wait" not in serial["phases"]


def test_early_failure_is_excluded_and_counted_and_slow_server_scores_are_right(streamed_and_serial):
    streamed, _ = streamed_and_serial
    rewards, advantages, metrics = streamed["rewards"], streamed["advantages"], streamed["metrics"]
    assert rewards.failed.tolist() == [True] * 4 + [False] * 8  # the first micro-batch's group
    assert rewards.failure_counts == {REWARD: 4} and [f.sample for f in rewards.failures] == [0, 1, 2, 3]
    assert metrics["reward/failed_samples"] == 4.0 and metrics[f"reward/{REWARD}/failed"] == 4.0
    assert not advantages.valid[:4].any() and advantages.advantages[:4].abs().sum() == 0.0
    # The slow server's answers are the brightness of each row's own image (computed here from the step's images).
    for row, image in enumerate(images_to_pil(streamed["images"])):
        if row >= 4:
            assert float(rewards.scores[row, 0]) == pytest.approx(ImageStat.Stat(image.convert("L")).mean[0] / 255.0,
                                                                  abs=1e-6), row
    assert metrics["train/step_applied"] == 1.0


def test_reward_chunks_hold_whole_groups():
    assert reward_chunks(8, 8, 4) == [slice(0, 8)]
    assert reward_chunks(16, 4, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    assert reward_chunks(12, 6, 4) == [slice(0, 4), slice(4, 12)]  # micro-batches end at 6 and 12
    assert reward_chunks(8, 2, 4) == [slice(0, 4), slice(4, 8)]  # a group spans two micro-batches
    assert reward_chunks(8, 16, 4) == [slice(0, 8)]


class PromptReward:
    """score = red / 255; fails on prompts containing 'bad'; metrics as the UnifiedReward client reports them."""

    score_range = (0.0, 1.0)
    service = "in-process test reward"

    def check_ready(self):
        pass

    def score(self, images, prompts, group_ids):
        values = [None if "bad" in p else image.getpixel((0, 0))[0] / 255 for image, p in zip(images, prompts)]
        errors = [f"cannot score {p!r}" if "bad" in p else None for p in prompts]
        pairs = 3 * len(images)  # three comparisons per image; those of a 'bad' image unparsed
        parsed = 3 * sum("bad" not in p for p in prompts)
        return RewardScores(values=values, errors=errors, metrics={"pairs": float(pairs), "answer_parse_rate":
                                                                   parsed / pairs})

    def close(self):
        pass


def test_merged_chunks_equal_one_call():
    images = torch.rand(8, 3, 4, 4)
    prompts = ["ok"] * 2 + ["bad"] + ["ok"] * 5
    weights = [{"r": 1.0}] * 8
    step = RewardStep({"r": PromptReward()})
    try:
        whole = step.score(images, prompts, weights, list(range(8)))
        parts = [step.score(images[c], prompts[c], weights[c], list(range(8))[c]) for c in (slice(0, 4), slice(4, 8))]
    finally:
        step.close()
    merged = merge_reward_batches(parts)
    assert torch.equal(merged.scores.nan_to_num(-1), whole.scores.nan_to_num(-1))
    assert torch.equal(merged.failed, whole.failed) and merged.failure_counts == whole.failure_counts == {"r": 1}
    assert [f.sample for f in merged.failures] == [2]
    assert merged.metrics["r/pairs"] == whole.metrics["r/pairs"] == 24.0
    # Rates weighted by each chunk's pairs: (12 x 9/12 + 12 x 12/12) / 24 = 21/24, the one call's rate.
    assert merged.metrics["r/answer_parse_rate"] == pytest.approx(21 / 24) == whole.metrics["r/answer_parse_rate"]


def test_window_trains_only_its_steps_and_keeps_w_plus_one_latents(streamed_and_serial):
    for run in streamed_and_serial:
        start, end = run["window"]
        assert 1 <= start and end == start + 3 <= 5  # drawn in [a, b - W] of --sde_window_range 1,5
        assert run["trained"] == list(range(start, end))  # --timestep_fraction 1: all W steps, nothing outside
        assert run["latents_shape"] == (12, 4, 16, 8, 8)  # W + 1 = 4 slots of T + 1 = 7
        assert run["final"] is None  # x_T released once decoded
        assert run["metrics"]["policy/first_chunk_ratio_max_dev"] <= 1e-6
    assert streamed_and_serial[0]["window"] == streamed_and_serial[1]["window"]


def test_group_aligned_chunking_is_logged_only_when_micro_batches_split_groups(caplog):
    from deepgen_rl.trainer.streaming import log_chunking

    with caplog.at_level("INFO", logger="deepgen_rl.trainer.streaming"):
        log_chunking(8, 4, stream=True)
        log_chunking(6, 4, stream=False)
        assert caplog.text == ""
        log_chunking(6, 4, stream=True)
    assert "--rollout_micro_batch_size 6 is not a multiple of --rollout_n 4" in caplog.text

"""Issue 11 items 1 and 10 at the entry point, in-process on the tiny model (one-process gloo group):

* the OCR server is killed (SIGKILL) after step 1 and never comes back: the run stops with a non-zero exit and a
  message naming the reward, its URL and its start script; checkpoints written before the fault remain; the run
  summary is printed and written;
* inputs whose contents would fail later stop the run before any model loads.
"""

from __future__ import annotations

import json
import logging

import pytest

import deepgen_rl.model
from deepgen_rl import grpo_deepgen
from deepgen_rl.preflight.content import InputContentError
from deepgen_rl.trainer import grpo_trainer
from tests.reward_servers import fake_server
from tests.trainer_utils import ZERO2, tiny_run_flags

pytestmark = pytest.mark.timeout(300)


def _ocr_dataset(folder, prompts: list[str]):
    (folder / "text.txt").write_text("\n".join(prompts) + "\n")
    path = folder / "ocr_only.yaml"
    path.write_text("datasets:\n  - name: text\n    path: text.txt\n    rewards:\n      - ocr: 1.0\n")
    return path


def _flags(tiny_paths, out, dataset, **overrides):
    return tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO2), dataset_config=str(dataset), sftaux_coef=0,
                          beta=0, **overrides)


@pytest.fixture()
def tracker_env(monkeypatch):
    for name, value in grpo_deepgen.TRACKER_MODE_DEFAULTS.items():  # main() sets them: keep them test-local
        monkeypatch.setenv(name, value)


def test_ocr_server_killed_after_step_one_stops_the_run_with_a_message_and_keeps_checkpoints(
        process_group, tiny_paths, tmp_path, monkeypatch, caplog, tracker_env):
    dataset = _ocr_dataset(tmp_path, ['a sign reading "OPEN"', 'a mug saying "HI"'])
    out = tmp_path / "run"
    server = fake_server()
    real_after_step = grpo_trainer.DeepGenGRPOTrainer._after_step

    def after_step_then_kill(self, *args, **kwargs):
        real_after_step(self, *args, **kwargs)  # step 1 is logged and checkpointed first
        if self.state.global_step == 1:
            server.kill()  # SIGKILL, never restarted

    monkeypatch.setattr(grpo_trainer.DeepGenGRPOTrainer, "_after_step", after_step_then_kill)
    flags = _flags(tiny_paths, out, dataset, max_steps=6, save_strategy="steps", save_steps=1,
                   ocr_url=server.url, max_failed_reward_steps=2, reward_max_retries=0, reward_retry_backoff=0.01,
                   reward_health_timeout=0.5)
    server.start()
    try:
        with caplog.at_level(logging.INFO):
            code = grpo_deepgen.main(flags)
    finally:
        server.stop()

    assert code == grpo_deepgen.EXIT_REWARD_FAILURE != 0
    stops = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "training stopped" in
             r.getMessage()]
    assert len(stops) == 1, caplog.text
    message = stops[0].removeprefix("training stopped: ")
    assert "reward 'ocr' failed on every one of its samples in 2 consecutive steps (steps 2-3" in message
    assert f"re-checked before giving up: OCR server at {server.url} is not reachable" in message
    assert "bash scripts/reward_ocr.sh" in message and "--resume_from_checkpoint latest" in message
    # Checkpoints written before the fault remain; the stop checkpointed step 3 and the run went no further.
    assert (out / "checkpoint-1" / "latest").is_file() and (out / "checkpoint-3" / "latest").is_file()
    assert not (out / "checkpoint-4").exists() and not (out / "checkpoint-6").exists()
    # 2 prompts x 4 images a step: step 1 scored, steps 2 and 3 failed entirely and were skipped.
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps_trained"] == 1 and summary["steps_skipped"] == 2
    assert summary["samples"] == {"ocr": 24} and summary["failed_samples"] == {"ocr": 16}
    assert summary["stopped_because"] == message
    assert "run summary: 1 step(s) trained, 2 skipped; failed samples per reward: ocr 16/24" in caplog.text


def test_entry_point_checks_input_contents_before_any_model_loads(process_group, tiny_paths, tmp_path,
                                                                  monkeypatch, tracker_env):
    dataset = _ocr_dataset(tmp_path, ['a sign reading "OPEN"', "a quiet forest at dawn"])

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input contents were checked")

    monkeypatch.setattr(deepgen_rl.model, "load_deepgen_model", no_model)
    with pytest.raises(InputContentError) as raised:
        grpo_deepgen.main(_flags(tiny_paths, tmp_path / "run", dataset, max_steps=1))
    assert f"{tmp_path / 'text.txt'}:2." in str(raised.value) and "no double-quoted target text" in str(raised.value)

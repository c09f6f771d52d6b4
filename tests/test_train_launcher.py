"""scripts/train.sh checks paths and servers before it launches anything, and says how to fix what is wrong."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import REPO_ROOT

TRAIN_SH = REPO_ROOT / "scripts" / "train.sh"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is released


def _run_train_sh(env_overrides: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SD3_5_MODEL_NAME_OR_PATH", "QWEN2_5_VL_MODEL_NAME_OR_PATH", "CHECKPOINT",
                        "CLIP_MODEL_NAME_OR_PATH", "OCR_URL", "UNIFIEDREWARD_THINK_URL", "UNIGENBENCH_API_URL")}
    env.update(PYTHON=sys.executable, NGPUS="1", **env_overrides)
    return subprocess.run(["bash", str(TRAIN_SH), "--server_wait", "1",
                           *flags], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_missing_model_path_names_the_variable(tiny_paths, tmp_path):
    env = tiny_paths.env()
    env["SD3_5_MODEL_NAME_OR_PATH"] = str(tmp_path / "no_such_model")
    result = _run_train_sh(env, "--output_dir", str(tmp_path / "out"), "--eval_freq", "0")
    assert result.returncode != 0
    assert "SD3_5_MODEL_NAME_OR_PATH" in result.stderr and "no_such_model" in result.stderr
    assert "torch.distributed" not in result.stderr  # stopped before torchrun
    assert not (tmp_path / "out").exists()


def test_unreachable_reward_server_names_url_and_script(tiny_paths, tmp_path):
    ocr_url = f"http://127.0.0.1:{_closed_port()}"
    judge_url = f"http://127.0.0.1:{_closed_port()}"
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "config.json").write_text("{}")
    env = dict(tiny_paths.env(), OCR_URL=ocr_url, UNIFIEDREWARD_THINK_URL=ocr_url, UNIGENBENCH_API_URL=judge_url,
               CLIP_MODEL_NAME_OR_PATH=str(clip_dir))
    # The shipped training YAML uses ocr, unifiedreward_think and clip_sim.
    result = _run_train_sh(env, "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"OCR server at {ocr_url}" in result.stderr and "scripts/reward_ocr.sh" in result.stderr
    assert "scripts/reward_unifiedreward.sh" in result.stderr
    assert f"UniGenBench judge at {judge_url}" in result.stderr and "--eval_freq 0" in result.stderr
    assert "SD3_5_MODEL_NAME_OR_PATH" not in result.stderr  # the tiny model paths are fine

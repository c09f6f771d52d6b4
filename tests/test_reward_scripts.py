"""scripts/reward_unifiedreward.sh builds the vLLM command; scripts/reward_ocr.sh starts our OCR server."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.reward_servers import ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("VLLM_", "UNIFIEDREWARD_", "OCR_")) and k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)


def vllm_argv(**env: str) -> list[str]:
    result = run("reward_unifiedreward.sh", "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[0] == "VLLM_SERVER_DEV_MODE=1" and argv[1:3] == ["vllm", "serve"]
    return argv[3:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_default_command_matches_the_reference_flags():
    argv = vllm_argv(CUDA_VISIBLE_DEVICES="0,1,2")
    assert argv[0] == "CodeGoat24/UnifiedReward-Think-qwen3vl-8b"
    assert flag(argv, "--port") == "18087"
    assert flag(argv, "--served-model-name") == "UnifiedReward"
    assert flag(argv, "--limit-mm-per-prompt.image") == "16"
    assert "--enable-sleep-mode" in argv and "--enable-prefix-caching" in argv
    assert flag(argv, "--data-parallel-size") == "3"  # one replica per visible GPU
    assert "--tensor-parallel-size" not in argv


def test_parallel_modes_model_and_extra_args():
    argv = vllm_argv(VLLM_PARALLEL_MODE="dp", VLLM_DATA_PARALLEL_SIZE="8", UNIFIEDREWARD_MODEL="/models/ur think")
    assert argv[0] == "/models/ur think" and flag(argv, "--data-parallel-size") == "8"
    result = run("reward_unifiedreward.sh", "--dry-run", "--", "--max-model-len", "16384",
                 VLLM_PARALLEL_MODE="tp", VLLM_TENSOR_PARALLEL_SIZE="4", UNIFIEDREWARD_PORT="19000")
    argv = shlex.split(result.stdout)[3:]
    assert flag(argv, "--tensor-parallel-size") == "4" and "--data-parallel-size" not in argv
    assert flag(argv, "--port") == "19000" and flag(argv, "--max-model-len") == "16384"


@pytest.mark.parametrize("env, variable", [
    ({"VLLM_PARALLEL_MODE": "pp"}, "VLLM_PARALLEL_MODE"),
    ({"VLLM_DATA_PARALLEL_SIZE": "two"}, "VLLM_DATA_PARALLEL_SIZE"),
    ({"VLLM_PARALLEL_MODE": "tp", "VLLM_TENSOR_PARALLEL_SIZE": "0"}, "VLLM_TENSOR_PARALLEL_SIZE"),
    ({"UNIFIEDREWARD_PORT": "port"}, "UNIFIEDREWARD_PORT"),
])
def test_bad_settings_fail_naming_the_variable(env, variable):
    result = run("reward_unifiedreward.sh", "--dry-run", **env)
    assert result.returncode != 0
    assert variable in result.stderr and result.stdout == ""


def test_ocr_script_dry_run_and_bad_port():
    result = run("reward_ocr.sh", "--dry-run", "--engine", "rapidocr", OCR_PORT="18555", PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:3] == [sys.executable, "-m", "deepgen_rl.rewards.servers.ocr"]
    assert flag(argv, "--port") == "18555" and flag(argv, "--engine") == "rapidocr"
    assert flag(run("reward_ocr.sh", "--dry-run").stdout.split(), "--port") == "18082"
    bad = run("reward_ocr.sh", "--dry-run", OCR_PORT="http")
    assert bad.returncode != 0 and "OCR_PORT" in bad.stderr


def test_ocr_script_starts_a_healthy_server():
    port = free_port()
    env = {**os.environ, "OCR_PORT": str(port), "OCR_HOST": "127.0.0.1", "PYTHON": sys.executable}
    with ServerProcess(["bash", str(SCRIPTS / "reward_ocr.sh"), "--log-level", "warning"], port, env=env) as server:
        health = httpx.get(server.url + "/health", timeout=5).json()
    assert health == {"status": "ok", "engine": "rapidocr"}


def test_vllm_binds_loopback_unless_vllm_host_says_otherwise():
    quiet = run("reward_unifiedreward.sh", "--dry-run")
    assert flag(shlex.split(quiet.stdout)[3:], "--host") == "127.0.0.1"
    assert "warning" not in quiet.stderr
    assert "--vllm_sleep_switching" in quiet.stderr and "nothing switches it" in quiet.stderr
    exposed = run("reward_unifiedreward.sh", "--dry-run", VLLM_HOST="0.0.0.0")
    assert exposed.returncode == 0 and flag(shlex.split(exposed.stdout)[3:], "--host") == "0.0.0.0"
    assert "warning: binding 0.0.0.0" in exposed.stderr and "/sleep" in exposed.stderr
    own = run("reward_unifiedreward.sh", "--dry-run", VLLM_HOST="0.0.0.0", UNIFIEDREWARD_HOST="localhost")
    assert flag(shlex.split(own.stdout)[3:], "--host") == "localhost" and "warning" not in own.stderr

"""scripts/eval_unigenbench_evalmodel.sh builds the vLLM command of the judge (checked with --dry-run)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_unigenbench_evalmodel.sh"
OUR_VARS = ("UNIGENBENCH_MODEL_PATH", "UNIGENBENCH_MODEL", "UNIGENBENCH_MODEL_NAME", "UNIGENBENCH_PORT",
            "UNIGENBENCH_HOST", "VLLM_PARALLEL_MODE", "VLLM_DATA_PARALLEL_SIZE", "VLLM_TENSOR_PARALLEL_SIZE",
            "VLLM_GPU_MEMORY_UTILIZATION", "CUDA_VISIBLE_DEVICES", "VLLM_HOST")


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if key not in OUR_VARS}
    # No GPUs here: pin the visible count so the default parallel size does not depend on the machine.
    base["CUDA_VISIBLE_DEVICES"] = "0,1"
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=30)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_dry_run_prints_vllm_serve_on_port_8000():
    result = run_script("--dry-run")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[0] == "VLLM_SERVER_DEV_MODE=1" and argv[1:3] == ["vllm", "serve"]
    assert argv[3] == "CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1"
    assert flag_value(argv, "--port") == "8000"
    assert flag_value(argv, "--served-model-name") == "UniGenBench-EvalModel-qwen3vl-32b-v1"
    assert flag_value(argv, "--data-parallel-size") == "2" and "--tensor-parallel-size" not in argv
    assert "--enable-sleep-mode" in argv


def test_environment_overrides_and_extra_args():
    result = run_script("--dry-run", "--", "--max-model-len", "32768", UNIGENBENCH_MODEL_PATH="/models/my judge",
                        UNIGENBENCH_MODEL_NAME="judge", UNIGENBENCH_PORT="9001", VLLM_PARALLEL_MODE="tp",
                        VLLM_TENSOR_PARALLEL_SIZE="4")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[3] == "/models/my judge"  # one argument despite the space
    assert flag_value(argv, "--port") == "9001" and flag_value(argv, "--served-model-name") == "judge"
    assert flag_value(argv, "--tensor-parallel-size") == "4" and "--data-parallel-size" not in argv
    assert argv[-2:] == ["--max-model-len", "32768"]
    dp = shlex.split(run_script("--dry-run", VLLM_DATA_PARALLEL_SIZE="8", UNIGENBENCH_MODEL="legacy/name").stdout)
    assert flag_value(dp, "--data-parallel-size") == "8" and dp[3] == "legacy/name"


@pytest.mark.parametrize("env, variable", [
    ({"VLLM_PARALLEL_MODE": "pp"}, "VLLM_PARALLEL_MODE"),
    ({"VLLM_DATA_PARALLEL_SIZE": "two"}, "VLLM_DATA_PARALLEL_SIZE"),
    ({"VLLM_PARALLEL_MODE": "tp", "VLLM_TENSOR_PARALLEL_SIZE": "0"}, "VLLM_TENSOR_PARALLEL_SIZE"),
    ({"UNIGENBENCH_PORT": "80a"}, "UNIGENBENCH_PORT"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "90"}, "VLLM_GPU_MEMORY_UTILIZATION"),
])
def test_bad_settings_fail_naming_the_variable(env, variable):
    result = run_script("--dry-run", **env)
    assert result.returncode != 0 and result.stdout == ""
    assert variable in result.stderr


def test_without_vllm_it_says_what_to_install(tmp_path):
    result = run_script(PATH=f"{tmp_path}:/usr/bin:/bin")  # an environment without vllm
    assert result.returncode != 0 and "vllm is not on PATH" in result.stderr


def test_judge_binds_loopback_unless_vllm_host_says_otherwise():
    quiet = run_script("--dry-run")
    assert flag_value(shlex.split(quiet.stdout), "--host") == "127.0.0.1" and "warning" not in quiet.stderr
    assert "--vllm_sleep_switching" in quiet.stderr
    exposed = run_script("--dry-run", VLLM_HOST="10.0.0.5")
    assert flag_value(shlex.split(exposed.stdout), "--host") == "10.0.0.5"
    assert "warning: binding 10.0.0.5" in exposed.stderr and "dev" in exposed.stderr

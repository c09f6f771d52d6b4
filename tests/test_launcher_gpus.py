"""Every launcher counts the GPUs CUDA will show (CUDA_VISIBLE_DEVICES first, `nvidia-smi -L` lists them all) and
prints what it takes; a machine with 8 GPUs is played by a stand-in nvidia-smi on PATH. Also the launchers'
help: train.sh prints it once, reward_server.sh NAME --help prints it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


@pytest.fixture()
def eight_gpu_path(tmp_path) -> str:
    """PATH with an nvidia-smi that lists 8 GPUs, whatever CUDA_VISIBLE_DEVICES says (as the real one does)."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n'
                                            for i in range(8)))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return f"{fake.parent}:{os.environ['PATH']}"


def _env(path: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "NGPUS", "NNODES", "VLLM_DATA_PARALLEL_SIZE", "VLLM_PARALLEL_MODE",
                        "VLLM_TENSOR_PARALLEL_SIZE", "SD3_5_MODEL_NAME_OR_PATH", "CHECKPOINT")}
    return {**env, "PATH": path, "PYTHON": sys.executable, **overrides}


def _run(script: str, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", ["reward_unifiedreward.sh", "eval_unigenbench_evalmodel.sh"])
def test_vllm_launchers_take_the_visible_gpus(script, eight_gpu_path):
    every = _run(script, _env(eight_gpu_path), "--dry-run")
    assert every.returncode == 0, every.stderr
    assert "--data-parallel-size 8" in every.stdout and "all GPUs of this machine" in every.stderr
    two = _run(script, _env(eight_gpu_path, CUDA_VISIBLE_DEVICES="2,3", VLLM_GPU_MEMORY_UTILIZATION="0.45"),
               "--dry-run")
    assert "--data-parallel-size 2" in two.stdout and "--gpu-memory-utilization 0.45" in two.stdout
    assert "GPUs taken: CUDA_VISIBLE_DEVICES=2,3; dp size 2; each GPU's memory fraction 0.45" in two.stderr
    ranged = _run(script, _env(eight_gpu_path, CUDA_VISIBLE_DEVICES="0-5"), "--dry-run")
    assert ranged.returncode == 2 and "'0-5' is not a GPU index" in ranged.stderr


def test_train_sh_counts_cuda_visible_devices_and_checks_the_batch_before_loading(tiny_paths, eight_gpu_path,
                                                                                  tmp_path):
    flags = ["--output_dir", str(tmp_path / "out"), "--eval_freq", "0", "--sftaux_coef", "0"]
    env = _env(eight_gpu_path, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5", **tiny_paths.env(),
               DATASET_CONFIG="assets/rl_datasets/quickstart/quickstart.yaml")
    result = _run("train.sh", env, *flags)
    # 6 of the 8 GPUs: 32 prompts per step do not split over 6 ranks, named before torchrun loads anything.
    assert result.returncode == 1, result.stderr[-2000:]
    assert "GPUs taken: 6 per node (CUDA_VISIBLE_DEVICES=0,1,2,3,4,5) x NNODES 1 = world size 6" in result.stdout
    assert "world size (6)" in result.stderr and "torch.distributed" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_sh_help_is_printed_once(eight_gpu_path):
    result = _run("train.sh", _env(eight_gpu_path), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: python -m deepgen_rl.grpo_deepgen") == 1
    assert "NNODES=4 NODE_RANK=0" in result.stdout  # the launcher's own variables first
    assert "'latest'" in result.stdout and "not directly used by" not in result.stdout  # --resume_from_checkpoint


def test_reward_server_help(tmp_path):
    env = _env(os.environ["PATH"])
    alone = _run("reward_server.sh", env, "--help")
    assert alone.returncode == 0 and "unknown reward server" not in alone.stderr
    assert "bash scripts/reward_server.sh pickscore" in alone.stdout
    named = _run("reward_server.sh", env, "hpsv2", "--help")
    assert named.returncode == 0, named.stderr
    assert "bash scripts/reward_server.sh pickscore" in named.stdout and "--batch-size" in named.stdout


@pytest.mark.parametrize("script, variable", [("reward_unifiedreward.sh", "UNIFIEDREWARD_MODEL"),
                                              ("eval_unigenbench_evalmodel.sh", "UNIGENBENCH_MODEL_PATH")])
def test_vllm_launchers_say_whether_they_download(script, variable, eight_gpu_path, tmp_path):
    hub = _run(script, _env(eight_gpu_path), "--dry-run")
    assert "is not a local folder, so vLLM will DOWNLOAD it" in hub.stderr and f"Set {variable}=" in hub.stderr
    local = _run(script, _env(eight_gpu_path, **{variable: str(tmp_path)}), "--dry-run")
    assert f"model: local folder {tmp_path}" in local.stderr and "DOWNLOAD" not in local.stderr
    assert f"vllm serve {tmp_path}" in local.stdout

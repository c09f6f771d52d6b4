"""scripts/gpu_kit.sh --dry-run lists the GPU machine's wheel kit without the network, and the kit's versions of
our own pins are pyproject.toml's (the kit is built from scripts/gpu_kit.txt; deepspeed's pin is read from
pyproject.toml)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT


def _pins() -> dict[str, str]:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {name.lower().replace("_", "-"): version
            for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^";]+)"', block)}


def test_dry_run_lists_the_wheels_and_builds_deepspeed_offline():
    # No network: an unreachable proxy and an empty index would make any fetch fail.
    env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "GPU_KIT_DIR": "/nonexistent/kit"}
    result = subprocess.run(["bash", "scripts/gpu_kit.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^  (\S+)==(\S+)$", result.stdout, re.M)
    names = [name.lower().replace("_", "-") for name, _ in listed]
    assert len(names) == len(set(names)) >= 20  # one version of each: two would stop the install there
    # What the GPU machine lacks (diffusers, fastapi, pydantic, mmengine) or holds at another version (transformers
    # 5.17) is in; its own torch and what it has at a fitting version are not.
    assert {"diffusers", "fastapi", "pydantic", "mmengine", "transformers", "uvicorn"} <= set(names)
    assert not {"torch", "numpy", "accelerate", "tokenizers", "safetensors"} & set(names)
    pins = _pins()
    for name, version in listed:
        key = name.lower().replace("_", "-")
        if key in pins:
            assert version == pins[key], f"{name}: kit {version}, pyproject.toml {pins[key]}"
    assert f"would build: deepspeed=={pins['deepspeed']} (pure Python, DS_BUILD_OPS=0)" in result.stdout
    assert "/nonexistent/kit/" in result.stdout and not (REPO_ROOT / "nonexistent").exists()


def test_an_unknown_option_is_refused():
    result = subprocess.run(["bash", "scripts/gpu_kit.sh", "--dryrun"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "usage: bash scripts/gpu_kit.sh [--dry-run]" in result.stderr

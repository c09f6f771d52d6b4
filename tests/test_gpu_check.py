"""benchmarks/gpu_check.py stays runnable without a GPU: its real-size configs give DeepGen's sizes (built on the
meta device), its --smoke mode runs the same GRPO step on tiny parts, and without CUDA it exits 0 saying why."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _billions(params) -> float:
    return sum(p.numel() for p in params) / 1e9


def test_real_configs_have_deepgen_sizes(gpu_check):
    model = gpu_check.build_random_deepgen(gpu_check.REAL, torch.bfloat16, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}  # nothing allocated
    assert _billions(model.lmm.parameters()) == pytest.approx(3.75, abs=0.02)  # tied lm_head counted once
    assert _billions(model.lmm.model.visual.parameters()) == pytest.approx(0.67, abs=0.01)
    connector = [p for name, p in model.named_parameters()
                 if name.startswith(("connector.", "projector_", "meta_queries"))]
    assert _billions(connector) == pytest.approx(0.43, abs=0.01)
    model.set_trainable("dit")
    assert _billions(p for p in model.parameters() if p.requires_grad) == pytest.approx(2.24, abs=0.02)
    assert model.latent_shape(512, 512) == (16, 64, 64)
    assert model.fusion_layers == [35, 29, 23, 17, 11, 5]


def test_without_cuda_it_exits_0_saying_why(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_smoke_runs_one_grpo_step_and_prints_the_figures(gpu_check, process_group, capsys):
    # In process, in the session's one-rank gloo group (gpu_check reuses a live group and leaves it): DeepSpeed
    # loads its CPU communication op once per process, so a subprocess would pay that again.
    with torch.random.fork_rng():
        assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    figures = {name: float(value) for name, value in re.findall(
        r"^\s+(rollout images/s|decode seconds|train-phase seconds|first-chunk ratio max dev)\s+(\S+)$", out, re.M)}
    assert set(figures) == {"rollout images/s", "decode seconds", "train-phase seconds", "first-chunk ratio max dev"}
    assert figures["rollout images/s"] > 0 and figures["decode seconds"] > 0 and figures["train-phase seconds"] > 0
    assert figures["first-chunk ratio max dev"] <= 1e-6  # rollout and training share the sampler arithmetic
    assert "8 images at 64^2" in out and "peak GPU memory" in out

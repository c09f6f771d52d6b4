"""benchmarks/gpu_check.py stays runnable without a GPU: its real-size model is DeepGen's (built on the meta device
from the published configs), its --smoke mode runs the whole sequence on tiny parts in bf16 with gradient
checkpointing and passes, an injected fault makes it exit 1 naming the failed check, and without CUDA it exits 0
saying why."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"
pytestmark = pytest.mark.timeout(600)


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


def test_real_model_has_deepgen_sizes_and_the_kontext_dit(gpu_check, tmp_path):
    from deepgen_rl.model.kontext import SD3Transformer2DKontextModel

    model = gpu_check.setup._random_real_model(tmp_path, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}  # nothing allocated
    assert type(model.transformer) is SD3Transformer2DKontextModel  # UniPic2's class, as its config names it
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert _billions(model.lmm.parameters()) == pytest.approx(3.75, abs=0.02)  # tied lm_head counted once
    assert _billions(model.lmm.model.visual.parameters()) == pytest.approx(0.67, abs=0.01)
    connector = [p for name, p in model.named_parameters()
                 if name.startswith(("connector.", "projector_", "meta_queries"))]
    assert _billions(connector) == pytest.approx(0.43, abs=0.01)
    model.set_trainable("dit")
    assert _billions(p for p in model.parameters() if p.requires_grad) == pytest.approx(2.24, abs=0.02)
    assert model.latent_shape(512, 512) == (16, 64, 64)
    assert model.fusion_layers == [35, 29, 23, 17, 11, 5]
    # The LLM LoRA of CHECKPOINT: the 7 projections of each of the 36 language layers, in peft's names and shapes,
    # paired by the loader's own reader.
    from deepgen_rl.model.checkpoint_keys import split_lora

    lora = gpu_check.setup.llm_lora_state(model.lmm, 4, torch.Generator().manual_seed(0))
    assert len(split_lora(lora).pairs) == 36 * 7 and len(lora) == 2 * 36 * 7
    assert lora["lmm.model.language_model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 11008)
    assert lora["lmm.model.language_model.layers.0.mlp.down_proj.lora_B.weight"].shape == (2048, 4)


def test_only_adds_what_a_part_needs(gpu_check):
    assert gpu_check.expand_only("convert") == ["train", "save", "convert"]
    assert gpu_check.expand_only("edit,rollout") == ["rollout", "edit"]
    assert gpu_check.expand_only("") == list(gpu_check.PHASES)
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_check.expand_only("train,bogus")


def test_without_cuda_it_exits_0_saying_why(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def _run(gpu_check, monkeypatch, *argv: str) -> int:
    monkeypatch.setenv("PYTHONPATH", "")  # restored afterwards (main() prepends the checkout for its servers)
    with torch.random.fork_rng():
        return gpu_check.main(["--smoke", *argv])


def test_smoke_runs_every_part_in_bf16_and_passes(gpu_check, process_group, capsys, monkeypatch, tmp_path):
    # In process, in the session's one-rank gloo group (gpu_check reuses a live group and leaves it): DeepSpeed
    # loads its CPU communication op once per process, so a subprocess would pay that again.
    code = _run(gpu_check, monkeypatch, "--out", str(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "weights bfloat16, gradient checkpointing on, EMA decay 0.99, SFT-aux 0.0001, streamed rewards True" in out
    assert out.rstrip().endswith("gpu_check: PASSED")
    deviations = [float(v) for v in re.findall(r"first-chunk ratio max dev (\S+) \(bound", out)]
    # Run steps 1-2, resumed step 2, edit step: within 10% of the default clip range 1e-4 (the printed bound).
    assert len(deviations) == 4 and all(d <= 1e-5 for d in deviations) and "(bound 1e-05)" in out
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failures"] == [] and summary["parts"] == list(gpu_check.PHASES)
    phases = {record["phase"] for record in summary["phases"]}
    assert {"run:rollout", "run:train", "run:eval", "run:save", "resumed:load", "resumed:train", "convert",
            "edit:rollout", "edit:train"} <= phases
    assert [record["step"] for record in summary["steps"] if "train/step_applied" in record] == [1, 2]


@pytest.mark.parametrize("fault, failure", [("nan_loss", "run step 1: non-finite loss/policy"),
                                            ("ratio", "run step 1: first-chunk ratio deviation")])
def test_an_injected_fault_fails_the_check(gpu_check, process_group, capsys, monkeypatch, fault, failure):
    code = _run(gpu_check, monkeypatch, "--only", "train", "--inject_fault", fault)
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"FAIL {failure}" in out and "gpu_check: FAILED" in out

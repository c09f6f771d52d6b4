"""RL checkpoint -> SFT .pth: real DeepSpeed ZeRO-2/3 checkpoints convert to reference keys and load back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from deepgen_rl.model import load_checkpoint_into, load_deepgen_model
from deepgen_rl.model.tiny import build_tiny_deepgen
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "utils" / "rlckpt_to_sftckpt.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_checkpoint(tmp_path, stage: int, trainable: str):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "scripts" / "write_ds_checkpoint.py"),
                    "--stage", str(stage), "--trainable", trainable, "--out", str(tmp_path)],
                   check=True, env=env, timeout=240, capture_output=True)
    return tmp_path / "checkpoint-1", torch.load(tmp_path / "expected.pt", weights_only=True)


@pytest.mark.parametrize("stage, trainable", [(2, "dit"), (3, "dit_connector")])
def test_deepspeed_checkpoint_converts_and_loads_back(tmp_path, tiny_model_args, stage, trainable):
    checkpoint_dir, trained = _write_checkpoint(tmp_path, stage, trainable)
    output = tmp_path / "out" / "rl.pth"
    result = subprocess.run([sys.executable, str(SCRIPT), "--rl_checkpoint", str(checkpoint_dir),
                             "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ON TOP of the pretraining checkpoint" in result.stdout

    converted = torch.load(output, weights_only=True)
    # Only what RL trained (and the buffers of those modules, e.g. the DiT's fixed pos_embed), under reference names.
    buffers = {name for name, _ in build_tiny_deepgen(seed=0).named_buffers()}
    assert set(trained) <= set(converted) and set(converted) - set(trained) <= buffers
    assert not any(k.startswith(("vae.", "lmm.", "ema.", "module.")) for k in converted)
    for key, value in trained.items():
        torch.testing.assert_close(converted[key], value.float(), rtol=0, atol=0)
    # Changed by the step, so the comparison above is not vacuous.
    initial = build_tiny_deepgen(seed=0).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in trained.items())

    # Pretraining checkpoint first (CHECKPOINT), the converted RL one on top: no trainable key missing.
    model = load_deepgen_model(tiny_model_args)
    load_checkpoint_into(model, output, trainable_modules=trainable)
    own = model.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def test_missing_or_empty_rl_checkpoint_is_explained(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--rl_checkpoint", str(tmp_path / "nope"),
                             "--output", str(tmp_path / "x.pth")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--rl_checkpoint" in result.stderr and "does not exist" in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "--rl_checkpoint", str(tmp_path),
                             "--output", str(tmp_path / "x.pth")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "neither a DeepSpeed checkpoint" in result.stderr
    assert not (tmp_path / "x.pth").exists()


def test_plain_state_dict_with_module_prefix_converts(tmp_path):
    state = {"module.transformer.proj_out.weight": torch.ones(2, 2), "module.vae.decoder.w": torch.ones(1),
             "module.lmm.model.language_model.norm.weight": torch.ones(3)}
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    result = subprocess.run([sys.executable, str(SCRIPT), "--rl_checkpoint", str(folder), "--output",
                             str(tmp_path / "o.pth"), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / "o.pth", weights_only=True)
    # The LLM was trained here, so its keys are kept, in the reference (old transformers) layout.
    assert set(converted) == {"transformer.proj_out.weight", "lmm.model.norm.weight"}
    assert converted["transformer.proj_out.weight"].dtype == torch.bfloat16

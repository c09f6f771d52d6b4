"""scripts/quickstart.sh end to end (shortened): tiny models, OCR server, GRPO through train.sh, conversion."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from PIL import Image

from deepgen_rl.model import load_checkpoint_into, load_deepgen_model
from tests.conftest import REPO_ROOT


def test_quickstart_writes_curve_grids_and_pth(tmp_path, tiny_model_args):
    out = tmp_path / "quickstart"
    env = dict(os.environ, PYTHON=sys.executable, QUICKSTART_DIR=str(out), QUICKSTART_STEPS="4")
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting the OCR reward server" in result.stdout  # RapidOCR is a dependency: the server path runs

    curve = out / "run" / "reward_curve.png"
    grids = sorted((out / "run" / "samples").glob("step_*.png"))
    assert curve.is_file() and Image.open(curve).size[0] > 100
    assert len(grids) >= 2 and all(Image.open(g).size[0] >= 64 for g in grids)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4

    pth = out / "deepgen_rl_quickstart.pth"
    converted = torch.load(pth, weights_only=True)
    assert converted and all(key.startswith("transformer.") for key in converted)
    model = load_deepgen_model(tiny_model_args)
    load_checkpoint_into(model, pth, trainable_modules="dit")
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in converted.items())

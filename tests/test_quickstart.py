"""scripts/quickstart.sh end to end (shortened): the pretrained tiny model (the shipped one, or the session's),
OCR server, before/after sample grids, GRPO through train.sh with synthetic_match, conversion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from deepgen_rl.model import load_checkpoint_into, load_deepgen_model
from tests.conftest import REPO_ROOT, SHIPPED_PRETRAINED, model_args_for

# The session's pretraining (tests/conftest.py, in the background) may still be running: ~4-5 min of one core.
pytestmark = pytest.mark.timeout(1200)


def test_quickstart_writes_curve_grids_and_pth(tmp_path, pretrained_tiny_paths):
    out = tmp_path / "quickstart"
    env = dict(os.environ, PYTHON=sys.executable, QUICKSTART_DIR=str(out), QUICKSTART_STEPS="4")
    shipped = pretrained_tiny_paths.checkpoint.parent == SHIPPED_PRETRAINED
    if not shipped:  # DEEPGEN_RL_TEST_PRETRAINED: the session's model, where the quick start caches one it
        # pretrains (QUICKSTART_PRETRAIN=1): the script must reuse it.
        shutil.copytree(pretrained_tiny_paths.checkpoint.parent, out / "tiny_pretrained")
        env["QUICKSTART_PRETRAIN"] = "1"
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting the OCR reward server" in result.stdout  # RapidOCR is a dependency: the server path runs
    assert "reusing the pretrained tiny model" in (out / "pretrain.log").read_text()
    assert ("the shipped model" in result.stdout) == shipped

    curve = out / "run" / "synthetic_reward_curve.png"
    grids = sorted((out / "run" / "samples").glob("step_*.png"))
    assert curve.is_file() and Image.open(curve).size[0] > 100
    assert len(grids) >= 2 and all(Image.open(g).size[0] >= 64 for g in grids)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("reward/synthetic_match/mean" in json.loads(line) for line in lines)
    # Before / after grids: 8 prompts x 8 samples of 64 px, with a caption strip under each row.
    summaries = [json.loads(line.split(":", 1)[1]) for line in result.stdout.splitlines()
                 if line.startswith(("before GRPO:", "after GRPO:"))]
    assert len(summaries) == 2 and all(0 <= s["reward"] <= 1 for s in summaries)
    for name in ("before.png", "after.png"):
        width, height = Image.open(out / name).size
        assert width == 8 * 64 and height > 8 * 64

    pth = out / "deepgen_rl_quickstart.pth"
    converted = torch.load(pth, weights_only=True)
    assert converted and all(key.startswith("transformer.") for key in converted)
    model = load_deepgen_model(model_args_for(pretrained_tiny_paths))
    load_checkpoint_into(model, pth, trainable_modules="dit")
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in converted.items())


@pytest.mark.parametrize("setting", ["QUICKSTART_LR=abc", "QUICKSTART_PRETRAIN_STEPS=-5",
                                     "QUICKSTART_PRETRAIN_VAE_STEPS=x", "QUICKSTART_PRETRAIN=yes"])
def test_bad_setting_is_named_and_replaces_nothing(tmp_path, setting):
    out = tmp_path / "quickstart"
    (out / "run").mkdir(parents=True)
    earlier = [out / "run" / "metrics.jsonl", out / "before.png", out / "after.png"]
    for path in earlier:
        path.write_text("an earlier run's result")
    name, value = setting.split("=")
    env = dict(os.environ, PYTHON=sys.executable, QUICKSTART_DIR=str(out), **{name: value})
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"error: {name} must be" in result.stderr and value in result.stderr
    assert all(path.read_text() == "an earlier run's result" for path in earlier)

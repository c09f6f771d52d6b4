"""``python -m deepgen_rl.eval --rl_checkpoint`` evaluates an RL checkpoint (issue 24 item 7): the converted .pth
(or the checkpoint folder itself) is layered on the model paths + CHECKPOINT, and its evaluation equals the
evaluation of the live trained model (stand-in judge on 127.0.0.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepgen_rl.config import EvalArguments, JudgeArguments
from deepgen_rl.eval.__main__ import main as eval_main
from deepgen_rl.eval.dataset import load_eval_datasets
from deepgen_rl.eval.report import REPORT_JSON, SAMPLES_DIR
from deepgen_rl.eval.runner import GenerationSettings, model_generate_fn, run_evaluation
from deepgen_rl.model import load_deepgen_model
from deepgen_rl.model.convert import convert_rl_checkpoint
from tests.servers.fake_judge import FakeJudge
from tests.test_eval_runner import SERVED, write_bench

SIZE, SEED, MICRO, DECODE = 64, 42, 32, 8  # the CLI's defaults (GRPOConfig's seed and micro-batches), 64 px


def _images(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def test_eval_of_a_converted_rl_checkpoint_equals_eval_of_the_live_trained_model(tiny_model_args, tmp_path):
    yaml_path = write_bench(tmp_path / "data", steps=2, duplicates=1)
    # The "trained" model: pretraining (paths + CHECKPOINT) whose DiT an RL run moved; its checkpoint-N folder
    # holds what RL trained (a plain state dict here; the converter reads DeepSpeed shards the same way).
    model = load_deepgen_model(tiny_model_args).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.transformer.parameters():
            parameter.add_(0.3 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path / "run" / "checkpoint-7"
    folder.mkdir(parents=True)
    torch.save({f"transformer.{k}": v for k, v in model.transformer.state_dict().items()}, folder / "model.pth")
    converted = tmp_path / "rl_step7.pth"
    convert_rl_checkpoint(folder, converted)

    with FakeJudge(rule="name", pass_dims="Style,Attribute") as judge:
        datasets = load_eval_datasets(yaml_path)
        live = run_evaluation(model_generate_fn(model, SIZE, SIZE, MICRO, DECODE),
                              JudgeArguments(unigenbench_api_url=judge.url, unigenbench_model_name=SERVED),
                              EvalArguments(eval_num_sample_images=8), datasets,
                              GenerationSettings(SIZE, SIZE, SEED, MICRO, DECODE), tmp_path / "live", step=7)
        common = ["--eval_dataset_config", str(yaml_path), "--unigenbench_api_url", judge.url,
                  "--unigenbench_model_name", SERVED, "--image_height", str(SIZE), "--image_width", str(SIZE),
                  "--step", "7", "--device", "cpu", "--sd3_model_name_or_path", tiny_model_args.sd3_model_name_or_path,
                  "--qwen2_5_vl_model_name_or_path", tiny_model_args.qwen2_5_vl_model_name_or_path,
                  "--checkpoint", tiny_model_args.checkpoint, "--model_dtype", "float32",
                  *[part for name in ("num_queries", "num_fusion_layers", "connector_hidden_size",
                                      "connector_intermediate_size", "connector_num_layers", "connector_num_heads")
                    for part in (f"--{name}", str(getattr(tiny_model_args, name)))]]
        assert eval_main([*common, "--output_dir", str(tmp_path / "pth"), "--rl_checkpoint", str(converted)]) == 0
        assert eval_main([*common, "--output_dir", str(tmp_path / "folder"), "--rl_checkpoint", str(folder)]) == 0
        assert eval_main([*common, "--output_dir", str(tmp_path / "base")]) == 0  # CHECKPOINT alone

    assert live.complete
    live_report = json.loads((tmp_path / "live" / REPORT_JSON).read_text())
    expected = _images(tmp_path / "live" / SAMPLES_DIR / "bench")
    assert len(expected) == 3
    for name in ("pth", "folder"):
        report = json.loads((tmp_path / name / REPORT_JSON).read_text())
        assert report["complete"] and report["datasets"] == live_report["datasets"]
        got = _images(tmp_path / name / SAMPLES_DIR / "bench")
        assert got.keys() == expected.keys()
        # Two model instances with equal weights: at most a rounding step of the 8-bit images apart.
        assert all(np.abs(got[k] - expected[k]).max() <= 2 for k in expected), name
    # The RL weights matter: without them the images are far from the trained model's.
    base = _images(tmp_path / "base" / SAMPLES_DIR / "bench")
    assert all(np.abs(base[k] - expected[k]).mean() > 5 for k in expected)


def test_rl_checkpoint_that_does_not_exist_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        eval_main(["--output_dir", str(tmp_path / "out"), "--rl_checkpoint", str(tmp_path / "checkpoint-9")])
    assert done.value.code == 2
    assert f"--rl_checkpoint '{tmp_path / 'checkpoint-9'}' does not exist" in capsys.readouterr().err

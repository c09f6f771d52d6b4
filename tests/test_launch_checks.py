"""A user's first cluster run (issue 24): the launch preflight refuses a real-size model without CHECKPOINT, shouts
when the real model meets our shipped example data (with counts), names a batch that does not split over the GPUs,
prints the run length, and reports every local problem at once before waiting for any server; servers are then
awaited together under one deadline. The entry point repeats the flag-and-file checks before any model loads."""

from __future__ import annotations

import csv
import json
import socket
import time
from pathlib import Path

import pytest

from deepgen_rl import preflight
from deepgen_rl.config import parse_args
from deepgen_rl.data.dataset_yaml import load_dataset_config
from deepgen_rl.model.published_configs import write_published_configs
from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "assets"


def _lines(path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _shipped_counts() -> tuple[int, int, int]:
    """(training prompts, eval prompts, SFT-aux images) of the shipped examples, counted from the files here."""
    prompts = _lines(SHIPPED / "rl_datasets/deepgen/general.txt") + _lines(SHIPPED / "rl_datasets/deepgen/text_render.txt")
    with (SHIPPED / "rl_datasets/deepgen/eval/unigenbench/test_prompts_en.csv").open(encoding="utf-8") as handle:
        eval_prompts = len(list(csv.DictReader(handle)))
    images = _lines(SHIPPED / "sftaux/captions.jsonl")
    return prompts, eval_prompts, images


@pytest.fixture(scope="module")
def real_configs(tmp_path_factory):
    """Real-size SD3.5 / Qwen2.5-VL folders (configs only: the preflight never reads weights)."""
    return write_published_configs(tmp_path_factory.mktemp("real"))


def _closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_real_model_without_checkpoint_on_shipped_data_is_refused_at_once(real_configs, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.delenv("CHECKPOINT", raising=False)
    sd3, qwen = real_configs
    start = time.monotonic()
    # Defaults everywhere (the shipped data, periodic evaluation on, default --server_wait of 15 min) and 6 GPUs;
    # no server runs: the local problems must come without waiting for any.
    code = preflight.main(["--world_size", "6", "--output_dir", str(tmp_path / "out"),
                           "--sd3_model_name_or_path", str(sd3), "--qwen2_5_vl_model_name_or_path", str(qwen),
                           "--ocr_url", _closed_url(), "--unigenbench_api_url", _closed_url()])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 60  # no server waited for (the default wait is 900 s)
    assert "CHECKPOINT is not set" in err and "--allow_untrained_connector" in err
    prompts, eval_prompts, images = _shipped_counts()
    assert "WARNING: a real-size model with the repository's small EXAMPLE data" in err
    assert f"{prompts} prompt(s) in all" in err and prompts == 48
    assert f"{eval_prompts} eval prompt(s)" in err and f"{images} image(s) of the shipped examples" in err
    # 256 images / rollout_n 8 = 32 prompts per step do not split over 6 ranks.
    assert "world size (6)" in err and "Nearest valid --global_batch_size: 240 or 288" in err
    assert "servers are checked once these are fixed" in err and "is not reachable" not in err


def test_untrained_connector_allowed_and_tiny_models_need_no_checkpoint(real_configs, tiny_paths, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.delenv("CHECKPOINT", raising=False)
    sd3, qwen = real_configs
    common = ["--world_size", "8", "--output_dir", str(tmp_path / "out"), "--eval_freq", "0",
              "--dataset_config", str(REPO_ROOT / "assets/rl_datasets/quickstart/quickstart.yaml")]
    assert preflight.main([*common, "--sd3_model_name_or_path", str(sd3), "--qwen2_5_vl_model_name_or_path", str(qwen),
                           "--allow_untrained_connector"]) == 0
    assert preflight.main([*common, "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                           "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir)]) == 0
    captured = capsys.readouterr()
    assert "CHECKPOINT is not set" not in captured.err
    # The real model meets a shipped example (the quick-start prompts) and the SFT-aux images: warned, not refused.
    assert captured.err.count("EXAMPLE data") == 1
    assert captured.out.count("run length:") == 2


def test_run_length_and_first_checkpoint_are_printed(tiny_paths, tmp_path, capsys):
    yaml_path = tmp_path / "train.yaml"
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(100)))
    yaml_path.write_text("datasets:\n  - name: p\n    path: p.txt\n    rewards:\n      - jpeg_compressibility: 1.0\n")
    common = ["--output_dir", str(tmp_path / "out"), "--eval_freq", "0", "--dataset_config", str(yaml_path),
              "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
              "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir), "--sftaux_coef", "0"]
    assert preflight.main([*common, "--num_train_epochs", "3", "--global_batch_size", "64", "--rollout_n", "8"]) == 0
    # 100 prompts / (64 / 8 = 8 per step) = 13 steps per epoch (the last one partial), x 3 epochs = 39 steps.
    out = capsys.readouterr().out
    assert "100 prompt(s) / 8 prompts per step = 13 step(s) per epoch x --num_train_epochs 3 -> 39 GRPO step(s)" in out
    assert "first checkpoint after step 10, then every 10 (--save_steps)" in out
    assert preflight.main([*common, "--max_steps", "5", "--save_steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "--max_steps 5 -> 5 GRPO step(s)" in out and "first checkpoint after step 5" in out


def test_servers_are_awaited_together_within_server_wait(tiny_paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "PROGRESS_EVERY_S", 0.5)
    yaml_path = tmp_path / "train.yaml"
    (tmp_path / "p.txt").write_text('a sign that says "hi"\n')
    yaml_path.write_text("datasets:\n  - name: p\n    path: p.txt\n    rewards:\n      - ocr: 1.0\n")
    eval_yaml = REPO_ROOT / "assets/rl_datasets/deepgen/eval/eval.yaml"
    ocr_url, judge_url = _closed_url(), _closed_url()
    start = time.monotonic()
    code = preflight.main(["--output_dir", str(tmp_path / "out"), "--dataset_config", str(yaml_path),
                           "--eval_dataset_config", str(eval_yaml), "--ocr_url", ocr_url,
                           "--unigenbench_api_url", judge_url, "--server_wait", "3", "--sftaux_coef", "0",
                           "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                           "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir)])
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 1
    assert f"OCR server at {ocr_url}" in captured.err and f"UniGenBench judge at {judge_url}" in captured.err
    assert "waited 3 s" in captured.err
    # One after the other would take 2 x 3 s of waiting; together, one deadline (plus start-up).
    assert 3 - 0.6 <= elapsed < 5.5  # the health poll (0.5 s) stops when its next try would pass the deadline
    assert "preflight: waiting for 2 server(s) to answer" in captured.out and "of --server_wait 3 s" in captured.out


def test_entry_point_checks_before_any_model_loads(real_configs, monkeypatch):
    from deepgen_rl.preflight.launch_checks import LaunchCheckError, require_launchable

    monkeypatch.delenv("CHECKPOINT", raising=False)
    sd3, qwen = real_configs
    args, model_args, data_args, *_ = parse_args(["--output_dir", "unused", "--sd3_model_name_or_path", str(sd3),
                                                  "--qwen2_5_vl_model_name_or_path", str(qwen)])
    dataset = load_dataset_config(data_args.dataset_config)
    with pytest.raises(LaunchCheckError) as refused:
        require_launchable(args, model_args, data_args, dataset, world_size=6, sftaux_datasets=None)
    assert "CHECKPOINT is not set" in str(refused.value) and "world size (6)" in str(refused.value)
    model_args.allow_untrained_connector = True
    notes = require_launchable(args, model_args, data_args, dataset, world_size=8, sftaux_datasets=None)
    prompts, eval_prompts, _ = _shipped_counts()
    # TrainingArguments' default 3 epochs of ceil(48 / 32) = 2 steps.
    assert notes[0] == (f"run length: {prompts} prompt(s) / 32 prompts per step = 2 step(s) per epoch x "
                        "--num_train_epochs 3 -> 6 GRPO step(s); --max_steps N sets the length directly; first "
                        "checkpoint after step 6, then every 10 (--save_steps).")
    assert "EXAMPLE data" in notes[1] and f"{eval_prompts} eval prompt(s)" in notes[1]


def test_a_bad_flag_value_ends_in_its_message_not_a_traceback(capsys):
    from deepgen_rl.config import parse_args_or_exit

    with pytest.raises(SystemExit) as done:
        parse_args_or_exit(["--output_dir", "unused", "--rollout_n", "1"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: --rollout_n must be >= 2") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as done:
        preflight.main(["--output_dir", "unused", "--sde_eta", "2"])
    assert done.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_shipped_data_defaults_are_found_from_any_working_directory(tmp_path, monkeypatch):
    from deepgen_rl.config import DataArguments

    monkeypatch.chdir(tmp_path)  # e.g. `python -m deepgen_rl.eval --tiny` started outside the repository
    for key in ("DATASET_CONFIG", "EVAL_DATASET_CONFIG", "SFTAUX_DATASET_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    data = DataArguments()
    assert data.eval_dataset_config == str(REPO_ROOT / "assets/rl_datasets/deepgen/eval/eval.yaml")
    assert all(Path(value).is_file() for value in (data.dataset_config, data.sftaux_dataset_config))
    (tmp_path / "assets/rl_datasets/deepgen/eval").mkdir(parents=True)
    (tmp_path / "assets/rl_datasets/deepgen/eval/eval.yaml").write_text("datasets: []\n")
    assert DataArguments().eval_dataset_config == "assets/rl_datasets/deepgen/eval/eval.yaml"  # a local one wins


def test_a_deepspeed_json_that_disagrees_with_the_batch_is_named_before_loading(tiny_paths, tmp_path, capsys):
    config = json.loads((REPO_ROOT / "scripts/deepspeed/zero3.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 4  # the batch plan derives 32 (256 images over 8 ranks)
    path = tmp_path / "zero3_fixed.json"
    path.write_text(json.dumps(config))
    code = preflight.main(["--world_size", "8", "--output_dir", str(tmp_path / "out"), "--eval_freq", "0",
                           "--deepspeed", str(path), "--sftaux_coef", "0",
                           "--dataset_config", str(REPO_ROOT / "assets/rl_datasets/quickstart/quickstart.yaml"),
                           "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
                           "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"DEEPSPEED_CONFIG (--deepspeed) = {path}: --deepspeed: train_micro_batch_size_per_gpu = 4" in err
    assert "but the trainer derives 32" in err


def test_entry_point_refuses_before_awaiting_servers_or_loading_anything(real_configs, process_group, tmp_path,
                                                                         monkeypatch, caplog):
    """Without train.sh too: a real-size model without CHECKPOINT stops with exit 2 and the reason (no traceback)
    before any reward is built (a server-backed reward waits for /health; clip_sim loads CLIP) or the model loads."""
    import logging

    import deepgen_rl.model
    import deepgen_rl.rewards
    from deepgen_rl import grpo_deepgen

    def too_early(*args, **kwargs):
        raise AssertionError("built before the launch checks ran")

    monkeypatch.setattr(deepgen_rl.rewards, "build_rewards", too_early)
    monkeypatch.setattr(deepgen_rl.model, "load_deepgen_model", too_early)
    monkeypatch.delenv("CHECKPOINT", raising=False)
    sd3, qwen = real_configs
    with caplog.at_level(logging.ERROR):
        code = grpo_deepgen.main(["--output_dir", str(tmp_path / "run"), "--report_to", "none",
                                  "--sd3_model_name_or_path", str(sd3), "--qwen2_5_vl_model_name_or_path", str(qwen)])
    assert code == grpo_deepgen.EXIT_USAGE == 2
    assert "cannot launch" in caplog.text and "CHECKPOINT is not set" in caplog.text


def test_preflight_names_a_used_output_dir_before_waiting_for_servers(tiny_paths, tmp_path, capsys):
    """train.sh runs the preflight first: a fresh start into another run's folder is a local problem, reported with
    the others before any server is awaited (the workers would refuse it only after the wait); a resume is not."""
    from tests.test_run_folder import fake_checkpoint

    out = tmp_path / "out"
    fake_checkpoint(out, 3)
    common = ["--output_dir", str(out), "--eval_freq", "0", "--sftaux_coef", "0",
              "--dataset_config", str(REPO_ROOT / "assets/rl_datasets/quickstart/quickstart.yaml"),
              "--sd3_model_name_or_path", str(tiny_paths.sd3_dir),
              "--qwen2_5_vl_model_name_or_path", str(tiny_paths.qwen_dir)]
    assert preflight.main(common) == 1
    err = capsys.readouterr().err
    assert f"--output_dir {out} already holds another run (checkpoint-3)" in err and "--overwrite_output_dir" in err
    assert (out / "checkpoint-3").is_dir()  # the preflight moves nothing
    assert preflight.main([*common, "--resume_from_checkpoint", "latest"]) == 0
    assert "already holds another run" not in capsys.readouterr().err


def test_user_errors_end_in_one_message_in_the_estimator_preflight_and_eval(tmp_path, capsys, monkeypatch):
    """A batch that does not split over --num_gpus, a --deepspeed file that does not exist and an unset model path:
    each ends in its message and exit status 2, not a traceback (found by a newcomer's trial)."""
    from deepgen_rl import estimate_memory
    from deepgen_rl.eval.__main__ import main as eval_main

    with pytest.raises(SystemExit) as done:
        estimate_memory.main(["--output_dir", "unused", "--num_gpus", "6",
                              "--deepspeed", str(REPO_ROOT / "scripts/deepspeed/zero3.json")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Nearest valid --global_batch_size: 240 or 288" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as done:
        preflight.main(["--output_dir", str(tmp_path / "out"), "--deepspeed", "scripts/deepspeed/zero4.json"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "'scripts/deepspeed/zero4.json' is not a file" in err
    assert "DEEPSPEED_CONFIG" in err and "Traceback" not in err
    monkeypatch.delenv("SD3_5_MODEL_NAME_OR_PATH", raising=False)
    assert eval_main(["--output_dir", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    assert "SD3_5_MODEL_NAME_OR_PATH is not set" in capsys.readouterr().err

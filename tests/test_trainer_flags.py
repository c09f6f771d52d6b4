"""Inherited TrainingArguments flags are honoured or refused with what to use instead; --help shows our flags first,
grouped; DeepSpeed JSON values of the wrong type stop the run at parse time, naming the key and the file."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from transformers import TrainingArguments

from deepgen_rl.config import build_parser, parse_args
from deepgen_rl.config.deepspeed_json import deepspeed_type_errors
from deepgen_rl.grpo_deepgen import log_level_for
from deepgen_rl.config.trainer_flags import HONOURED_TRAINING_FLAGS, REFUSED_TRAINING_FLAGS
from tests.conftest import REPO_ROOT

DEEPSPEED_DIR = REPO_ROOT / "scripts" / "deepspeed"


def test_every_inherited_flag_is_honoured_or_refused():
    inherited = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert not HONOURED_TRAINING_FLAGS & REFUSED_TRAINING_FLAGS.keys()
    unclassified = inherited - HONOURED_TRAINING_FLAGS - REFUSED_TRAINING_FLAGS.keys()
    assert not unclassified, f"new TrainingArguments flags: honour or refuse each in trainer_flags.py: {unclassified}"
    stale = (HONOURED_TRAINING_FLAGS | REFUSED_TRAINING_FLAGS.keys()) - inherited
    assert not stale, f"no longer TrainingArguments flags: {stale}"


def test_batch_flags_are_refused_naming_the_flags_to_use(tmp_path):
    with pytest.raises(ValueError) as err:
        parse_args(["--output_dir", str(tmp_path), "--gradient_accumulation_steps", "4",
                    "--per_device_train_batch_size", "2"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # both reported at once
    assert lines[0].startswith("--per_device_train_batch_size 2 is not used by the GRPO loop")
    assert lines[1].startswith("--gradient_accumulation_steps 4 is not used by the GRPO loop")
    assert all("--global_batch_size" in line and "--atrain_micro_batch_size" in line for line in lines)


@pytest.mark.parametrize("flags, named, instead", [
    (["--optim", "adamw_torch"], "--optim 'adamw_torch'", "\"optimizer\" section to the --deepspeed JSON"),
    (["--torch_compile", "true"], "--torch_compile True", "remove the flag"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0.1", "GRPO has no labels"),
    (["--use_cpu", "true"], "--use_cpu True", "DS_ACCELERATOR=cpu"),
    (["--eval_strategy", "steps"], "--eval_strategy 'steps'", "--eval_freq"),
    (["--logging_steps", "10"], "--logging_steps 10", "metrics.jsonl"),
    (["--no_dataloader_pin_memory"], "--dataloader_pin_memory False", "--dataset_config"),
])
def test_ignored_trainer_flags_are_refused(flags, named, instead, tmp_path):
    with pytest.raises(ValueError) as err:
        parse_args(["--output_dir", str(tmp_path), *flags])
    assert str(err.value).startswith(named) and instead in str(err.value)


def test_unsupported_value_of_an_honoured_flag_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^--save_strategy 'epoch' is not supported by the GRPO loop: use steps or no"):
        parse_args(["--output_dir", str(tmp_path), "--save_strategy", "epoch"])


def test_honoured_inherited_flags_are_accepted(tmp_path):
    args, *_ = parse_args(["--output_dir", str(tmp_path), "--ddp_timeout", "60", "--log_level", "debug",
                             "--log_level_replica", "error", "--disable_tqdm", "true", "--save_total_limit", "2",
                             "--warmup_steps", "5", "--max_grad_norm", "0.5", "--do_train", "--seed", "3"])
    assert (args.ddp_timeout, args.disable_tqdm, args.save_total_limit, args.warmup_steps) == (60, True, 2, 5)


@pytest.mark.parametrize("rank, level, replica, expected", [
    (0, "passive", "warning", logging.INFO), (1, "passive", "passive", logging.WARNING),
    (0, "debug", "warning", logging.DEBUG), (1, "info", "error", logging.ERROR),
    (0, "critical", "info", logging.CRITICAL),
])
def test_log_level_flags(rank, level, replica, expected):
    assert log_level_for(rank, level, replica) == expected


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    import deepspeed

    from deepgen_rl import grpo_deepgen

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: seen.update(kwargs))
    assert grpo_deepgen._init_distributed(42) == "cpu"
    assert seen["timeout"].total_seconds() == 42


def test_help_lists_our_flags_first_grouped_and_hides_refused_ones():
    text = build_parser().format_help()
    headings = [text.index(h) for h in ("\nGRPOConfig:", "\nModelArguments:", "\nDataArguments:",
                                        "\nInherited from transformers.TrainingArguments")]
    assert headings == sorted(headings)
    assert text.index("--rollout_n ROLLOUT_N") < headings[1] < text.index("--max_prompt_length") < headings[2]
    assert headings[3] < text.index("--learning_rate LEARNING_RATE") and headings[3] < text.index("--deepspeed")
    for refused in ("--optim OPTIM", "--per_device_train_batch_size PER", "--gradient_accumulation_steps GRAD",
                    "--torch_compile [", "--label_smoothing_factor LABEL"):
        assert refused not in text
    assert "are not used by the GRPO loop" in " ".join(text.split())  # the epilog says where they went


# ---------- DeepSpeed JSON types ----------

def _write(tmp_path, config: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def test_mistyped_deepspeed_value_stops_at_parse_time_naming_key_and_file(tmp_path):
    config = json.loads((DEEPSPEED_DIR / "zero2.json").read_text())
    config["gradient_clipping"] = "1.0"
    config["zero_optimization"]["stage"] = "2"
    path = _write(tmp_path, config)
    with pytest.raises(ValueError) as err:
        parse_args(["--output_dir", str(tmp_path / "out"), "--deepspeed", str(path)])
    message = str(err.value)
    assert message.startswith(f"--deepspeed {path}: ")
    assert '"gradient_clipping" = "1.0" (str) must be a number or "auto"' in message
    assert '"zero_optimization.stage" = "2" (str) must be an integer' in message


def test_deepspeed_type_rules_hand_worked():
    ok = {"train_batch_size": "auto", "gradient_clipping": 1, "zero_optimization": {"stage": 3,
          "reduce_bucket_size": 5e8, "offload_param": {"device": "cpu", "pin_memory": True}},
          "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "lr": "auto"}}}
    assert deepspeed_type_errors(ok) == []
    bad = {"train_batch_size": True, "steps_per_print": "auto", "bf16": True,
           "zero_optimization": {"stage": 2.5, "overlap_comm": "true"}, "optimizer": {"params": {"betas": [0.9]}}}
    assert deepspeed_type_errors(bad) == [
        '"bf16" = true must be a JSON object',
        '"train_batch_size" = true (bool) must be an integer or "auto"',
        '"steps_per_print" = "auto" (str) must be an integer',
        '"zero_optimization.stage" = 2.5 (float) must be an integer',
        '"zero_optimization.overlap_comm" = "true" (str) must be true or false',
        '"optimizer.params.betas" = [0.9] (list) must be a list of two numbers or "auto"',
    ]
    assert deepspeed_type_errors([1, 2]) == ["the top level must be a JSON object, not list"]


def test_shipped_deepspeed_configs_pass():
    paths = sorted(DEEPSPEED_DIR.glob("*.json"))
    assert [p.name for p in paths] == ["zero2.json", "zero3.json", "zero3_offload.json", "zero3_sd3.json"]
    for path in paths:
        assert deepspeed_type_errors(json.loads(path.read_text())) == [], path

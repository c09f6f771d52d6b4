"""Flags: every default of the user guide, env-variable defaults, help strings, and clear errors on bad values."""

from __future__ import annotations

import dataclasses

import pytest

from deepgen_rl.config import (DataArguments, EvalArguments, GRPOConfig, JudgeArguments, ModelArguments,
                               RewardArguments, build_parser, parse_args)

# The guide's default-parameter table (docs/training_guide.md#default-parameters), with our two schedule defaults.
GUIDE_DEFAULTS = {
    "learning_rate": 2e-6,
    "rollout_n": 8,
    "rollout_micro_batch_size": 32,
    "atrain_micro_batch_size": 32,
    "atrain_sde_sampler": "cps_sde",
    "atrain_adv_type": "gdpo",
    "beta": 5e-7,
    "atrain_kl_type": "v-based",
    "num_inference_steps": 50,
    "image_height": 512,
    "image_width": 512,
    "timestep_fraction": 0.6,
    "clip_range": 1e-4,
    "optimizer_step_schedule": "reference",
    "atrain_num_actor_update_steps": 1,
    "sftaux_coef": 1e-4,
    "sftaux_global_batch_size": 32,  # the reference's 4 per GPU x the guide's 8 GPUs
    "eval_freq": 10,
    "gradient_checkpointing": True,
}

ENV_VARS = ["SD3_5_MODEL_NAME_OR_PATH", "QWEN2_5_VL_MODEL_NAME_OR_PATH", "CLIP_MODEL_NAME_OR_PATH", "CHECKPOINT",
            "OCR_URL", "UNIFIEDREWARD_THINK_URL", "UNIGENBENCH_API_URL", "DATASET_CONFIG", "EVAL_DATASET_CONFIG",
            "SFTAUX_DATASET_CONFIG", "UNIGENBENCH_MODEL_NAME"]


@pytest.fixture()
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_guide_default(clean_env, tmp_path):
    training, *_ = parse_args(["--output_dir", str(tmp_path)])
    for flag, expected in GUIDE_DEFAULTS.items():
        assert getattr(training, flag) == expected, flag


def test_reference_semantics_defaults(clean_env, tmp_path):
    training, model, *_ = parse_args(["--output_dir", str(tmp_path)])
    assert training.sde_eta == 1.0  # CPS reference: full re-noise of x0_hat
    assert training.logprob_variant == "reference"
    assert training.rollout_cfg_scale == 0.0 and training.init_same_noise
    assert training.advantage_clip == 5.0
    assert training.num_train_timesteps == 30  # int(50 * 0.6)
    assert model.trainable_modules == "dit" and not model.use_lora
    assert (model.num_queries, model.connector_hidden_size, model.connector_intermediate_size,
            model.connector_num_layers, model.connector_num_heads) == (128, 2048, 11946, 6, 32)


def test_flow_sde_eta_default(clean_env, tmp_path):
    training, *_ = parse_args(["--output_dir", str(tmp_path), "--atrain_sde_sampler", "flow_sde"])
    assert training.sde_eta == 0.7


def test_server_urls_and_paths_default_to_localhost_and_env(clean_env, tmp_path):
    _, model, data, rewards, judge, _ = parse_args(["--output_dir", str(tmp_path)])
    assert rewards.ocr_url == "http://localhost:18082"
    assert rewards.unifiedreward_think_url == "http://localhost:18087"
    assert judge.unigenbench_api_url == "http://localhost:8000"
    assert data.dataset_config == "assets/rl_datasets/deepgen/deepgen_train.yaml"
    assert data.eval_dataset_config == "assets/rl_datasets/deepgen/eval/eval.yaml"
    assert data.sftaux_dataset_config == "deepgen_rl/sft/configs/datasets/deepgen/t2i_grpo_moretextdata.py"
    assert model.sd3_model_name_or_path == "" and model.checkpoint == ""

    clean_env.setenv("OCR_URL", "http://reward-host:18082")
    clean_env.setenv("SD3_5_MODEL_NAME_OR_PATH", "/models/sd3")
    clean_env.setenv("DATASET_CONFIG", "my.yaml")
    _, model, data, rewards, *_ = parse_args(["--output_dir", str(tmp_path)])
    assert rewards.ocr_url == "http://reward-host:18082"
    assert model.sd3_model_name_or_path == "/models/sd3"
    assert data.dataset_config == "my.yaml"


def test_eval_flags_parse_into_eval_arguments(clean_env, tmp_path):
    training, *_, evaluation = parse_args(["--output_dir", str(tmp_path)])
    assert evaluation == EvalArguments(eval_timeout=3600.0, eval_max_prompts=0, eval_num_sample_images=8)
    assert not any(hasattr(training, flag) for flag in ("eval_timeout", "eval_max_prompts", "eval_num_sample_images"))
    *_, evaluation = parse_args(["--output_dir", str(tmp_path), "--eval_timeout", "90", "--eval_max_prompts", "4",
                                 "--eval_num_sample_images", "0"])
    assert evaluation == EvalArguments(eval_timeout=90.0, eval_max_prompts=4, eval_num_sample_images=0)


def test_every_own_field_has_help():
    inherited = {f.name for f in dataclasses.fields(GRPOConfig.__mro__[1])}
    for cls in (GRPOConfig, ModelArguments, DataArguments, RewardArguments, JudgeArguments, EvalArguments):
        for f in dataclasses.fields(cls):
            if cls is GRPOConfig and f.name in inherited and f.name not in GUIDE_DEFAULTS:
                continue
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help string"


@pytest.mark.parametrize(
    "cls, kwargs, flag",
    [
        (GRPOConfig, {"timestep_fraction": 1.5}, "--timestep_fraction"),
        (GRPOConfig, {"timestep_fraction": 0.0}, "--timestep_fraction"),
        (GRPOConfig, {"rollout_n": 1}, "--rollout_n"),
        (GRPOConfig, {"global_batch_size": 12}, "--global_batch_size"),
        (GRPOConfig, {"image_height": 500}, "--image_height"),
        (GRPOConfig, {"sftaux_coef": 2.0}, "--sftaux_coef"),
        (GRPOConfig, {"sftaux_global_batch_size": 0}, "--sftaux_global_batch_size"),
        (GRPOConfig, {"sde_eta": 0.0}, "--sde_eta"),
        (GRPOConfig, {"clip_range": -1.0}, "--clip_range"),
        (GRPOConfig, {"atrain_adv_type": "ppo"}, "--atrain_adv_type"),
        (GRPOConfig, {"clip_range_low": -1e-4}, "--clip_range_low and --clip_range_high"),
        (GRPOConfig, {"clip_range_low": 1e-4, "clip_range_high": 2e-4}, "--clip_range_low"),
        (GRPOConfig, {"optimizer_step_schedule": "per_chunk"}, "--optimizer_step_schedule"),
        (GRPOConfig, {"kl_forward": "twice"}, "--kl_forward"),
        (GRPOConfig, {"atrain_num_actor_update_steps": 0}, "--atrain_num_actor_update_steps"),
        (GRPOConfig, {"atrain_kl_type": "k3"}, "--atrain_kl_type"),
        (GRPOConfig, {"atrain_sde_sampler": "ode"}, "--atrain_sde_sampler"),
        (GRPOConfig, {"num_inference_steps": 1}, "--num_inference_steps"),
        (GRPOConfig, {"zero_variance_rtol": -1e-5}, "--zero_variance_rtol"),
        (GRPOConfig, {"max_failed_reward_steps": -1}, "--max_failed_reward_steps"),
        (GRPOConfig, {"max_reward_failure_rate": 0.0}, "--max_reward_failure_rate"),
        (GRPOConfig, {"max_reward_failure_rate": 1.5}, "--max_reward_failure_rate"),
        (GRPOConfig, {"reward_failure_window": 0}, "--reward_failure_window"),
        (GRPOConfig, {"reward_step_deadline": -1.0}, "--reward_step_deadline"),
        (ModelArguments, {"trainable_modules": "everything"}, "--trainable_modules"),
        (ModelArguments, {"connector_hidden_size": 100, "connector_num_heads": 32}, "--connector_hidden_size"),
        (ModelArguments, {"num_queries": 0}, "--num_queries"),
        (RewardArguments, {"ocr_url": "localhost:18082"}, "--ocr_url"),
        (RewardArguments, {"reward_timeout": 0}, "--reward_timeout"),
        (RewardArguments, {"reward_max_concurrency": 0}, "--reward_max_concurrency"),
        (JudgeArguments, {"unigenbench_api_url": "localhost:8000"}, "--unigenbench_api_url"),
        (JudgeArguments, {"judge_timeout": 0}, "--judge_timeout"),
        (JudgeArguments, {"judge_max_retries": -1}, "--judge_max_retries"),
        (JudgeArguments, {"judge_retry_backoff": -1.0}, "--judge_retry_backoff"),
        (EvalArguments, {"eval_timeout": -1.0}, "--eval_timeout"),
        (EvalArguments, {"eval_max_prompts": -1}, "--eval_max_prompts"),
        (EvalArguments, {"eval_num_sample_images": -1}, "--eval_num_sample_images"),
    ],
)
def test_bad_value_names_the_flag(cls, kwargs, flag, tmp_path):
    extra = {"output_dir": str(tmp_path)} if cls is GRPOConfig else {}
    with pytest.raises(ValueError, match=flag):
        cls(**extra, **kwargs)


@pytest.mark.parametrize("flag", [["--sftaux_batch_size", "4"], ["--sftaux_batch_size=4"]])
def test_removed_sftaux_batch_size_says_how_to_convert(clean_env, tmp_path, flag):
    with pytest.raises(ValueError, match=r"--sftaux_batch_size was removed.*--sftaux_global_batch_size.*"
                                         r"x NNODES x NGPUS"):
        parse_args(["--output_dir", str(tmp_path), *flag])


def test_parser_rejects_unknown_choice_naming_flag(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--atrain_kl_type", "k3"])
    assert "--atrain_kl_type" in capsys.readouterr().err


def test_guide_launcher_flags_parse(tmp_path):
    training, *_ = build_parser().parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--num_train_epochs", "10", "--lr_scheduler_type", "constant_with_warmup",
        "--report_to", "wandb,swanlab",
    ])
    assert training.num_train_epochs == 10
    assert training.lr_scheduler_type == "constant_with_warmup"
    assert training.report_to == ["wandb", "swanlab"]

"""Unit tests of the trainer's pure parts: batch plan, DeepSpeed "auto" filling, checkpoint folders, RNG, trackers,
SFT-aux data and step statistics. Expected values are worked out by hand in each test."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from deepgen_rl.config import GRPOConfig
from deepgen_rl.sft import SftAuxDataConfigError, SftAuxSampler, load_sftaux_config
from deepgen_rl.trainer import checkpointing
from deepgen_rl.trainer.batching import plan_batches, total_training_steps
from deepgen_rl.trainer.deepspeed_setup import fill_deepspeed_config, load_deepspeed_config
from deepgen_rl.trainer.logging_utils import TrackerSettings, image_grid
from deepgen_rl.trainer.step_metrics import reward_metrics
from tests.trainer_utils import REPO_ROOT, ZERO2, ZERO3

SFTAUX_CONFIG = REPO_ROOT / "deepgen_rl" / "sft" / "configs" / "datasets" / "deepgen" / "t2i_grpo_moretextdata.py"


# ----- batch plan --------------------------------------------------------------------------------------------


def test_guide_defaults_on_8_gpus():
    # 256 images / 8 per group = 32 prompts; / 8 ranks = 4 prompts = 32 samples per rank = one chunk of 32;
    # 30 of 50 steps trained -> 30 backward passes, + 1 for the SFT-aux batch.
    plan = plan_batches(global_batch_size=256, rollout_n=8, world_size=8, atrain_micro_batch_size=32,
                        num_train_timesteps=30, sftaux_enabled=True,
                        optimizer_step_schedule="per_rollout", actor_update_steps=1, kl_step=True)
    assert (plan.prompts_per_rank, plan.samples_per_rank, plan.chunks_per_timestep) == (4, 32, 1)
    assert plan.gradient_accumulation_steps == 31
    assert plan.deepspeed_train_batch_size == 32 * 31 * 8


def test_uneven_chunks_and_any_world_size():
    # 96 images / 4 per group = 24 prompts over 6 ranks = 4 prompts = 16 samples; chunks of 5 -> 5, 5, 5, 1.
    plan = plan_batches(global_batch_size=96, rollout_n=4, world_size=6, atrain_micro_batch_size=5,
                        num_train_timesteps=3, sftaux_enabled=False,
                        optimizer_step_schedule="per_rollout", actor_update_steps=1, kl_step=True)
    assert (plan.samples_per_rank, plan.chunks_per_timestep, plan.gradient_accumulation_steps) == (16, 4, 12)
    assert plan.train_micro_batch_size == 5


def test_reference_schedule_61_steps_at_the_guide_defaults():
    # docs/algorithms.md#optimizer-steps-per-rollout: 2 x 30 drawn steps x 1 update + 1 (SFT-aux) = 61 AdamW steps per
    # rollout,
    # each one backward (32 samples per rank = one chunk), so DeepSpeed accumulates 1.
    plan = plan_batches(global_batch_size=256, rollout_n=8, world_size=8, atrain_micro_batch_size=32,
                        num_train_timesteps=30, sftaux_enabled=True, optimizer_step_schedule="reference",
                        actor_update_steps=1, kl_step=True)
    assert (plan.optimizer_steps_per_rollout, plan.gradient_accumulation_steps) == (61, 1)
    # Without a KL (beta 0) the policy step is the only one per timestep; per_timestep never splits the KL.
    for schedule, kl_step, expected in (("reference", False, 31), ("per_timestep", True, 31),
                                        ("per_rollout", True, 1)):
        other = plan_batches(global_batch_size=256, rollout_n=8, world_size=8, atrain_micro_batch_size=32,
                             num_train_timesteps=30, sftaux_enabled=True, optimizer_step_schedule=schedule,
                             actor_update_steps=1, kl_step=kl_step)
        assert other.optimizer_steps_per_rollout == expected, schedule


def test_actor_updates_split_the_rank_samples_and_count_steps():
    # 16 samples per rank, 3 updates -> S = 5 (1 dropped); chunks of 2 -> 3 per timestep (2, 2, 1).
    plan = plan_batches(global_batch_size=32, rollout_n=4, world_size=2, atrain_micro_batch_size=2,
                        num_train_timesteps=4, sftaux_enabled=False, optimizer_step_schedule="reference",
                        actor_update_steps=3, kl_step=True)
    assert (plan.samples_per_update, plan.chunks_per_timestep, plan.gradient_accumulation_steps) == (5, 3, 3)
    assert plan.optimizer_steps_per_rollout == 3 * 4 * 2
    assert plan.policy_micro_steps == 3 * 4 * 3
    with pytest.raises(ValueError, match="--atrain_num_actor_update_steps 17 exceeds the 16 samples"):
        plan_batches(global_batch_size=32, rollout_n=4, world_size=2, atrain_micro_batch_size=2,
                     num_train_timesteps=4, sftaux_enabled=False, optimizer_step_schedule="reference",
                     actor_update_steps=17, kl_step=True)


def test_actor_update_parts_are_disjoint_and_chunked():
    from deepgen_rl.trainer.update_plan import actor_update_parts, part_chunks

    parts = actor_update_parts(11, 3, [torch.Generator().manual_seed(j) for j in range(3)])
    rows = torch.cat(parts).tolist()
    # 3 blocks of 3 rows (rows 9 and 10 are the dropped remainder): each part holds one row of every block.
    assert [len(p) for p in parts] == [3, 3, 3] and sorted(rows) == list(range(9))
    assert all([r // 3 for r in p.tolist()] == [0, 1, 2] for p in parts)
    assert [c.tolist() for c in part_chunks(parts[0], 11, 2)] == [parts[0][:2].tolist(), parts[0][2:].tolist()]
    with pytest.raises(ValueError, match="2 block generators for 3 blocks"):
        actor_update_parts(11, 3, [torch.Generator(), torch.Generator()])
    # One update keeps every row in order: the contiguous chunks of a per-rollout run.
    assert actor_update_parts(11, 1, []) == [slice(None)]
    assert part_chunks(slice(None), 5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_impossible_split_names_flags_and_nearest_values():
    # 256 / 8 = 32 prompts cannot be shared by 3 ranks; valid sizes are multiples of 8 x 3 = 24: 240 and 264.
    with pytest.raises(ValueError) as err:
        plan_batches(global_batch_size=256, rollout_n=8, world_size=3, atrain_micro_batch_size=32,
                     num_train_timesteps=30, sftaux_enabled=False,
                        optimizer_step_schedule="per_rollout", actor_update_steps=1, kl_step=True)
    message = str(err.value)
    assert "--global_batch_size" in message and "--rollout_n" in message and "world size (3)" in message
    assert "240 or 264" in message
    # Fewer prompts than ranks: 16 / 8 = 2 prompts for 4 ranks -> the smallest valid size is 8 x 4 = 32.
    with pytest.raises(ValueError, match=r"Nearest valid --global_batch_size: 32 "):
        plan_batches(global_batch_size=16, rollout_n=8, world_size=4, atrain_micro_batch_size=8,
                     num_train_timesteps=3, sftaux_enabled=False,
                        optimizer_step_schedule="per_rollout", actor_update_steps=1, kl_step=True)


def test_total_steps_from_epochs():
    # 10 epochs of 100 prompts at 32 prompts per step: ceil(100 / 32) = 4 steps per epoch -> 40.
    assert total_training_steps(max_steps=-1, num_train_epochs=10, num_prompts=100, prompts_per_step=32) == 40
    assert total_training_steps(max_steps=7, num_train_epochs=10, num_prompts=100, prompts_per_step=32) == 7


# ----- DeepSpeed config --------------------------------------------------------------------------------------


def _args(tmp_path, **kwargs) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def _plan():
    return plan_batches(global_batch_size=32, rollout_n=4, world_size=2, atrain_micro_batch_size=8,
                        num_train_timesteps=3, sftaux_enabled=True,
                        optimizer_step_schedule="per_rollout", actor_update_steps=1, kl_step=True)


def test_zero2_auto_values_filled_from_flags(tmp_path):
    args = _args(tmp_path, max_grad_norm=0.5)
    config = fill_deepspeed_config(load_deepspeed_config(str(ZERO2)), args=args, plan=_plan(), num_training_steps=10,
                                   hidden_size=64, trainable_dtype=torch.float32)
    # 32 / 4 = 8 prompts over 2 ranks -> 16 samples, chunks of 8 -> 2 x 3 steps + SFT = 7 backward passes.
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 7
    assert config["train_batch_size"] == 8 * 7 * 2
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    # bf16 weights switch "auto" bf16 on.
    bf16 = fill_deepspeed_config(load_deepspeed_config(str(ZERO2)), args=args, plan=_plan(), num_training_steps=10,
                                 hidden_size=64, trainable_dtype=torch.bfloat16)
    assert bf16["bf16"]["enabled"] is True


def test_zero3_and_optimizer_section_autos(tmp_path):
    args = _args(tmp_path, learning_rate=3e-5, weight_decay=0.1, warmup_steps=4)
    raw = load_deepspeed_config(str(ZERO3))
    raw["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}}
    raw["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    config = fill_deepspeed_config(raw, args=args, plan=_plan(), num_training_steps=20, hidden_size=10,
                                   trainable_dtype=torch.float32)
    assert config["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 4,
                                             "total_num_steps": 20}
    zero = config["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (90, 100)


def test_explicit_batch_value_that_disagrees_is_an_error(tmp_path):
    raw = load_deepspeed_config(str(ZERO2))
    raw["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match=r'gradient_accumulation_steps = 4.*derives 7.*"auto"'):
        fill_deepspeed_config(raw, args=_args(tmp_path), plan=_plan(), num_training_steps=10, hidden_size=8,
                              trainable_dtype=torch.float32)
    raw = load_deepspeed_config(str(ZERO2))
    raw["zero_optimization"]["mystery"] = "auto"
    with pytest.raises(ValueError, match="zero_optimization.mystery"):
        fill_deepspeed_config(raw, args=_args(tmp_path), plan=_plan(), num_training_steps=10, hidden_size=8,
                              trainable_dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="--deepspeed"):
        load_deepspeed_config(str(tmp_path / "nope.json"))


def test_shipped_deepspeed_configs_are_auto_style():
    for name in ("zero2", "zero3", "zero3_offload", "zero3_sd3"):
        config = json.loads((REPO_ROOT / "scripts" / "deepspeed" / f"{name}.json").read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                    "gradient_clipping"):
            assert config[key] == "auto", (name, key)
        assert config["bf16"]["enabled"] == "auto"
        assert config["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


# ----- checkpoint folders, RNG ---------------------------------------------------------------------------------


def _fake_checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "latest").write_text(f"global_step{step}")
        (folder / checkpointing.TRAINER_STATE_NAME).write_text(checkpointing.TrainerState(global_step=step).to_json())
        (folder / f"global_step{step}").mkdir()
        torch.save({"module": {}}, folder / f"global_step{step}" / "mp_rank_00_model_states.pt")
    return folder


def test_checkpoint_listing_rotation_and_resume_resolution(tmp_path):
    for step in (2, 10, 4):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 12, complete=False)  # crashed mid-save: no 'latest'
    (tmp_path / "tmp-checkpoint-14").mkdir()
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4",
                                                                           "checkpoint-10"]
    assert checkpointing.resolve_resume_path("latest", tmp_path).name == "checkpoint-10"
    assert checkpointing.resolve_resume_path(str(tmp_path / "checkpoint-4"), tmp_path).name == "checkpoint-4"
    assert checkpointing.resolve_resume_path(None, tmp_path) is None
    assert checkpointing.resolve_resume_path("latest", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        checkpointing.resolve_resume_path(str(tmp_path / "checkpoint-12"), tmp_path)
    removed = checkpointing.rotate_checkpoints(tmp_path, limit=2, keep=tmp_path / "checkpoint-10")
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pth"
    torch.save(checkpointing.capture_rng_state(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpointing.restore_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_trainer_state_json_round_trip():
    state = checkpointing.TrainerState(global_step=5, max_steps=9, prompt_sampler={"batches_drawn": 5},
                                       log_history=[{"step": 1, "reward/mean": 0.5}])
    assert checkpointing.TrainerState.from_json(state.to_json()) == state


# ----- logging ---------------------------------------------------------------------------------------------------


def test_tracker_settings_offline_by_default_and_env_respected():
    settings = TrackerSettings.from_env("wandb,swanlab", "run", {})
    assert settings.report_to == ("wandb", "swanlab")
    assert (settings.wandb_mode, settings.swanlab_mode) == ("offline", "offline")
    settings = TrackerSettings.from_env(["all"], None, {"WANDB_MODE": "online", "SWANLAB_PROJ_NAME": "P"})
    assert settings.report_to == ("wandb", "swanlab") and settings.wandb_mode == "online"
    assert settings.swanlab_project == "P" and settings.swanlab_mode == "offline"
    assert TrackerSettings.from_env("none", None, {}).report_to == ()
    with pytest.raises(ValueError, match="--report_to tensorboard"):
        TrackerSettings.from_env("tensorboard", None, {})


def test_image_grid_places_images_row_major():
    images = torch.zeros(3, 3, 2, 2)
    for i in range(3):
        images[i, i] = 1.0  # image i is pure red / green / blue
    grid = np.asarray(image_grid(images, columns=2))  # 2 rows x 2 columns of 2x2 tiles; the 4th tile empty
    assert grid.shape == (4, 4, 3)
    assert tuple(grid[0, 0]) == (255, 0, 0) and tuple(grid[0, 2]) == (0, 255, 0)
    assert tuple(grid[2, 0]) == (0, 0, 255) and tuple(grid[2, 2]) == (0, 0, 0)


def test_reward_metrics_hand_worked():
    nan = float("nan")
    # Two rewards; sample 2 failed on "a"; sample 3's dataset does not use "b".
    scores = torch.tensor([[1.0, 0.0], [3.0, 2.0], [nan, 4.0], [5.0, nan]])
    weights = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.0]])
    failed = torch.tensor([False, False, True, False])
    metrics = reward_metrics(["a", "b"], scores, weights, failed)
    # Weighted sums of the valid samples 0, 1, 3: 1.0, 4.0, 5.0 -> mean 10/3, population std sqrt(26/9).
    assert metrics["reward/mean"] == pytest.approx(10 / 3)
    assert metrics["reward/std"] == pytest.approx((26 / 9) ** 0.5)
    assert metrics["reward/a/mean"] == pytest.approx(3.0) and metrics["reward/a/failed"] == 1.0
    assert metrics["reward/b/mean"] == pytest.approx(2.0) and metrics["reward/b/failed"] == 0.0
    assert metrics["reward/failed_samples"] == 1.0


# ----- SFT-aux data ------------------------------------------------------------------------------------------------


def test_shipped_sftaux_config_and_resumable_sampler():
    datasets = load_sftaux_config(SFTAUX_CONFIG)
    assert len(datasets) == 1 and len(datasets[0]) == 6
    first = SftAuxSampler(datasets, seed=3, height=32, width=48)
    batches = [first.sample(4, 4) for _ in range(3)]
    assert batches[0].images.shape == (4, 3, 32, 48)
    assert 0.0 <= float(batches[0].images.min()) and float(batches[0].images.max()) <= 1.0
    resumed = SftAuxSampler(datasets, seed=0, height=32, width=48)
    state = dict(first.state_dict(), batches_drawn=2)
    resumed.load_state_dict(state)
    again = resumed.sample(4, 4)
    assert again.captions == batches[2].captions and torch.equal(again.images, batches[2].images)


def test_sftaux_config_errors_name_the_entry(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("sftaux_datasets = [dict(type='image_caption_jsonl', data_root='.', ann_file='missing.jsonl')]\n")
    with pytest.raises(SftAuxDataConfigError, match=r"sftaux_datasets\[0\].*missing.jsonl.*SFTAUX_DATASET_CONFIG"):
        load_sftaux_config(config)
    config.write_text("sftaux_datasets = [dict(type='webdataset', data_root='.')]\n")
    with pytest.raises(SftAuxDataConfigError, match="type must be one of"):
        load_sftaux_config(config)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("a dark square\n")
    config.write_text(f"sftaux_datasets = [dict(type='image_folder', data_root='{folder}')]\n")
    datasets = load_sftaux_config(config)
    assert datasets[0].items[0][1] == "a dark square"


def test_eval_hook_off_with_a_reason_when_config_or_judge_is_missing(tmp_path, caplog):
    import socket

    from deepgen_rl.config import DataArguments, EvalArguments, JudgeArguments
    from deepgen_rl.trainer.eval_hook import build_eval_hook

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    eval_yaml = REPO_ROOT / "assets" / "rl_datasets" / "deepgen" / "eval" / "eval.yaml"
    data = DataArguments(eval_dataset_config=str(eval_yaml))
    judge = JudgeArguments(unigenbench_api_url=f"http://127.0.0.1:{closed}", judge_health_timeout=0.5)
    assert build_eval_hook(_args(tmp_path, eval_freq=0), data, judge, EvalArguments()) is None
    with caplog.at_level("WARNING"):
        assert build_eval_hook(_args(tmp_path, eval_freq=5), data, judge, EvalArguments()) is None
    assert "periodic evaluation (--eval_freq 5) is OFF" in caplog.text and f"127.0.0.1:{closed}" in caplog.text
    caplog.clear()
    missing = DataArguments(eval_dataset_config=str(tmp_path / "none.yaml"))
    with caplog.at_level("WARNING"):
        assert build_eval_hook(_args(tmp_path, eval_freq=5), missing, judge, EvalArguments()) is None
    assert "none.yaml" in caplog.text and "--eval_dataset_config" in caplog.text


def test_trailing_mean_by_hand():
    from deepgen_rl.trainer.logging_utils import trailing_mean

    # width 2: [1], [1, 3], [3, 5], [5, 7]; width 1 is the values themselves.
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    assert trailing_mean([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]


def test_first_chunk_deviation_above_a_tenth_of_the_clip_range_is_warned():
    from deepgen_rl.trainer.updater import first_chunk_warning

    assert first_chunk_warning(0.0, 1e-4) is None and first_chunk_warning(float("nan"), 1e-4) is None
    assert first_chunk_warning(9.9e-6, 1e-4) is None  # 9.9% of the clip range
    message = first_chunk_warning(1.4e-5, 1e-4)  # the bf16 run: 14%
    assert message is not None and "1.4e-05 (14% of --clip_range 0.0001)" in message

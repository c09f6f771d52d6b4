"""Checkpoints on a real cluster (issue 11, items 2-5): SIGTERM under torchrun with a step longer than torchrun's
30 s grace, a 2-rank checkpoint resumed on 1 rank, code-carrying and truncated checkpoint files.

One torchrun run (2 ranks, ZeRO-2; every training chunk of step 2 sleeps, so step 2 lasts > 36 s) is SIGTERMed
inside step 2 under torchrun's DEFAULT grace; its checkpoint-1 is then resumed on 1 rank in this process. A
second, in-process 1-rank run writes checkpoint-1 and checkpoint-2 for the damaged-file cases; a ZeRO-3 pair checks
the weights-reset resume on partitioned parameters.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from deepgen_rl.model import load_checkpoint_into
from deepgen_rl.model.safe_load import UnsafeCheckpointError
from deepgen_rl.model.tiny import build_tiny_deepgen
from deepgen_rl.trainer import checkpointing
from tests.test_trainer_inprocess import build, history
from tests.trainer_utils import REPO_ROOT, ZERO2, free_port, run_env, tiny_run_flags

CHUNK_SLEEP_S = 12  # x 3 trained timesteps (T=6, fraction 0.6) = 36 s of step 2 beyond its compute: > 30 s grace
CONVERTER = REPO_ROOT / "scripts" / "utils" / "rlckpt_to_sftckpt.py"


class CodeCarrier:
    """Unpickling this runs a shell command that creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(file, marker) -> None:
    torch.save({"module": {"w": torch.ones(1)}, "payload": CodeCarrier(marker)}, file)


@pytest.fixture(scope="module")
def sigterm_run(tiny_paths, tmp_path_factory):
    """torchrun (2 ranks) SIGTERMed while step 2 trains; returns (output dir, torchrun exit code, its output)."""
    tmp = tmp_path_factory.mktemp("sigterm")
    out, marker = tmp / "run", tmp / "in_step_2"
    env = run_env(tiny_paths)
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)  # torchrun's default grace (30 s)
    # per_rollout: every chunk is a safe point. Under the default (reference) only the chunks before a step's first
    # optimizer step are, and the rest of this slowed step would outlast the grace.
    flags = tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO2), max_steps=3, optimizer_step_schedule="per_rollout")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO_ROOT / "tests" / "scripts" / "slow_step_run.py"),
               "--chunk_sleep", str(CHUNK_SLEEP_S), "--marker", str(marker), *flags]
    log = tmp / "torchrun.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), "the run never reached step 2:\n" + log.read_text()[-4000:]
            proc.send_signal(signal.SIGTERM)  # what a scheduler's preemption does to the launcher
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out, returncode, log.read_text()


def test_sigterm_under_torchrun_checkpoints_a_step_longer_than_the_grace(sigterm_run):
    out, returncode, output = sigterm_run
    assert returncode != 0  # torchrun itself reports that it was signalled
    assert "SIGKILL" not in output, "torchrun had to kill the workers: the checkpoint came too late"
    assert "step 2 abandoned at a safe point (training chunk" in output
    assert "worker exited cleanly at step 1" in output
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "latest").read_text().strip() == "global_step1"
    for name in ("rng_state_0.pth", "rng_state_1.pth", "global_step1/mp_rank_00_model_states.pt",
                 "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert (checkpoint / name).is_file(), name
    assert not list(out.glob("tmp-checkpoint-*")) and not (out / "checkpoint-2").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # The abandoned step's prompt draw is rewound: resume redraws step 2's prompts.
    assert state["global_step"] == 1 and state["world_size"] == 2
    assert state["prompt_sampler"]["batches_drawn"] == 1 and state["sftaux_sampler"]["batches_drawn"] == 1
    assert checkpointing.checkpoint_problems(checkpoint) == []
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]  # what was logged before the signal is kept


def test_resume_on_fewer_ranks_without_the_flag_names_both_sizes(sigterm_run, process_group, tiny_paths, tmp_path):
    checkpoint = sigterm_run[0] / "checkpoint-1"
    trainer = build(tiny_paths, tmp_path, max_steps=3)
    try:
        with pytest.raises(checkpointing.CheckpointLoadError) as err:
            trainer.train(resume_from_checkpoint=str(checkpoint))
    finally:
        trainer.close()
    message = str(err.value)
    assert str(checkpoint) in message and "world size 2" in message and "world size 1" in message
    assert "--resume_reset_optimizer true" in message and "relaunch on 2 processes" in message


def test_resume_on_fewer_ranks_with_reset_optimizer(sigterm_run, process_group, tiny_paths, tmp_path, caplog):
    checkpoint = sigterm_run[0] / "checkpoint-1"
    saved = torch.load(checkpoint / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trainer = build(tiny_paths, tmp_path, max_steps=3, resume_reset_optimizer=True,
                    optimizer_step_schedule="per_rollout")  # the schedule the torchrun run saved
    try:
        with caplog.at_level(logging.WARNING):
            trainer.load(checkpoint)
        assert "saved with world size 2; this run has 1" in caplog.text and "restart from zero" in caplog.text
        params = dict(trainer.model.named_parameters())
        trained = [name for name, p in params.items() if p.requires_grad]
        assert trained and all(torch.equal(params[name].detach(), saved[name]) for name in trained)
        assert trainer.state.global_step == 1 and trainer.prompt_sampler.batches_drawn == 1
        trainer.train()
    finally:
        trainer.close()
    records = history(trainer)
    assert sorted(records) == [1, 2, 3]  # step 1's record comes back with the trainer state
    assert records[2]["train/step_applied"] == 1.0 and records[3]["train/step_applied"] == 1.0
    # The schedule comes from the checkpoint (the torchrun run's base rate 2e-6, linear decay over 3 steps; this
    # process was built with 1e-3): it resumes at its second step.
    assert records[2]["train/lr"] == pytest.approx(2e-6 * (1 - 1 / 3), rel=1e-6)
    assert records[3]["train/lr"] == pytest.approx(2e-6 * (1 - 2 / 3), rel=1e-6)


@pytest.fixture(scope="module")
def one_rank_run(process_group, tiny_paths, tmp_path_factory):
    """1-rank run saving checkpoint-1 and checkpoint-2; returns (output dir, per-step metrics)."""
    out = tmp_path_factory.mktemp("one_rank")
    trainer = build(tiny_paths, out, max_steps=2, save_strategy="steps", save_steps=1)
    try:
        trainer.train()
    finally:
        trainer.close()
    return out, history(trainer)


def _copy_run(source, target):
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(source / name, target / name)
    return target


def test_resuming_an_older_checkpoint_moves_the_abandoned_newer_ones_out_of_latests_way(one_rank_run, tiny_paths,
                                                                                      tmp_path, caplog):
    # Issue 30: a rollback to checkpoint-1 left checkpoint-2 of the abandoned timeline where 'latest' (and the
    # rotation) picked it. Now it is moved aside, kept and named, with its metrics line. --max_steps 1: the resumed
    # run has no step left to train, so only the resume itself acts.
    out, _ = one_rank_run
    run = _copy_run(out, tmp_path / "run")
    shutil.copy(out / "metrics.jsonl", run / "metrics.jsonl")
    trainer = build(tiny_paths, run, max_steps=1, save_strategy="steps", save_steps=1, save_total_limit=2)
    try:
        with caplog.at_level(logging.WARNING):
            trainer.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    finally:
        trainer.close()
    assert checkpointing.newest_good_checkpoint(run) == run / "checkpoint-1"
    moved = [p for p in run.iterdir() if p.name.startswith("abandoned-after-step-1-")]
    assert len(moved) == 1 and checkpointing.checkpoint_problems(moved[0] / "checkpoint-2") == []
    assert [json.loads(line)["step"] for line in (moved[0] / "metrics.jsonl").read_text().splitlines()] == [2]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert f"were moved into {moved[0]}" in caplog.text


def test_code_carrying_file_is_refused_on_resume(one_rank_run, tiny_paths, tmp_path):
    run = _copy_run(one_rank_run[0], tmp_path / "run")
    shard = run / "checkpoint-2" / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code_ran"
    _plant(shard, marker)
    trainer = build(tiny_paths, tmp_path / "out", max_steps=2)
    try:
        with pytest.raises(UnsafeCheckpointError) as err:
            trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    finally:
        trainer.close()
    message = str(err.value)
    assert not marker.exists(), "the planted payload ran"
    assert str(shard) in message and "--resume_from_checkpoint" in message and "posix.system" in message
    assert "arbitrary code" in message and "weights_only=False" not in message


def test_latest_skips_a_truncated_newest_checkpoint_and_resumes_exactly(one_rank_run, tiny_paths, tmp_path, caplog):
    out, straight = one_rank_run
    run = _copy_run(out, tmp_path / "run")
    damaged = run / "checkpoint-2" / "global_step2" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a save cut short
    trainer = build(tiny_paths, run, max_steps=2, save_strategy="steps", save_steps=1)
    try:
        with caplog.at_level(logging.WARNING):
            trainer.train(resume_from_checkpoint="latest")
    finally:
        trainer.close()
    assert f"resuming from {run / 'checkpoint-1'} instead" in caplog.text
    assert f"{run / 'checkpoint-2'}: global_step2/mp_rank_00_model_states.pt is not a readable torch file" in caplog.text
    resumed = history(trainer)  # step 1's record comes back with checkpoint-1's trainer state
    assert sorted(resumed) == [1, 2] and trainer.state.global_step == 2
    for key in ("reward/mean", "loss/policy", "train/grad_norm", "train/lr"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-6, abs=1e-12), key
    # The damaged checkpoint-2 was replaced by the redone step's.
    assert checkpointing.checkpoint_problems(run / "checkpoint-2") == []


def test_damaged_checkpoints_are_named_in_every_error(one_rank_run, tmp_path):
    run = _copy_run(one_rank_run[0], tmp_path / "run")
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hist')
    with pytest.raises(checkpointing.CheckpointLoadError) as err:
        checkpointing.resolve_resume_path(str(run / "checkpoint-2"), run)
    assert str(run / "checkpoint-2") in str(err.value) and "trainer_state.json is unreadable" in str(err.value)
    assert "'latest'" in str(err.value)
    shard = run / "checkpoint-1" / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"")
    with pytest.raises(checkpointing.CheckpointLoadError) as err:
        checkpointing.resolve_resume_path("latest", run)
    message = str(err.value)
    assert "every checkpoint" in message and str(run / "checkpoint-1") in message and str(run / "checkpoint-2") in message
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt is not a readable torch file" in message


def _converter_main():
    """scripts/utils/rlckpt_to_sftckpt.py's main(), run in this process (no interpreter start-up per call)."""
    spec = importlib.util.spec_from_file_location("rlckpt_to_sftckpt", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_converter_refuses_a_code_carrying_shard_and_names_a_truncated_one(one_rank_run, tmp_path, capsys):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(one_rank_run[0] / "checkpoint-2", folder)
    shard = folder / "global_step2" / "mp_rank_00_model_states.pt"
    original = shard.read_bytes()
    marker = tmp_path / "code_ran"
    _plant(shard, marker)
    main = _converter_main()
    argv = ["--rl_checkpoint", str(folder), "--output", str(tmp_path / "o.pth")]
    assert main(argv) == 2 and not marker.exists()
    stderr = capsys.readouterr().err
    assert str(shard) in stderr and "--rl_checkpoint" in stderr and "posix.system" in stderr
    shard.write_bytes(original[: len(original) // 2])
    assert main(argv) == 2
    assert f"--rl_checkpoint '{folder}'" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
    shard.write_bytes(original)  # the intact checkpoint converts: the refusals above were about the files
    assert main(argv) == 0 and (tmp_path / "o.pth").is_file()


def test_code_carrying_CHECKPOINT_is_refused(tmp_path):
    path, marker = tmp_path / "pretrain.pth", tmp_path / "code_ran"
    _plant(path, marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_into(build_tiny_deepgen(seed=0), path)
    assert not marker.exists()
    assert str(path) in str(err.value) and "CHECKPOINT (--checkpoint)" in str(err.value)


def test_train_sh_rejects_a_non_numeric_shutdown_timeout():
    env = dict(os.environ, SHUTDOWN_TIMEOUT="soon", PYTHON=sys.executable, NGPUS="1")
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "train.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "SHUTDOWN_TIMEOUT" in result.stderr


def _build_zero3(tiny_paths, out, **overrides):
    from deepgen_rl import grpo_deepgen
    from deepgen_rl.config import parse_args
    from deepgen_rl.rewards.reward_step import RewardStep
    from tests.test_trainer_inprocess import Brightness
    from tests.trainer_utils import ZERO3

    args, *groups = parse_args(tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO3), **overrides))
    trainer = grpo_deepgen.build_trainer(args, *groups, "cpu")
    trainer.reward_step.close()
    trainer.reward_step = RewardStep({"jpeg_compressibility": Brightness()})
    return trainer


def test_weights_reset_path_fills_partitioned_zero3_parameters(process_group, tiny_paths, tmp_path):
    """The --resume_reset_optimizer path under ZeRO-3 (parameters partitioned): the merged fp32 weights of the
    checkpoint land in every parameter, and the next optimizer step starts from them. Then the exact ZeRO-3 resume
    through DeepSpeed's loader with weights-only loads forced (its shards hold allow-listed classes only)."""
    from tests.trainer_utils import param_digests

    from deepgen_rl.trainer.weights_resume import load_weights_reset_optimizer

    saver = _build_zero3(tiny_paths, tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1)
    try:
        saver.train()
        saved = param_digests(saver.model)
    finally:
        saver.close()
    # per_rollout: the one optimizer step of the next training step runs at the lr set below (more steps would run
    # at the LR schedule's rates).
    fresh = _build_zero3(tiny_paths, tmp_path / "b", max_steps=2, optimizer_step_schedule="per_rollout")
    try:
        before = param_digests(fresh.model)
        load_weights_reset_optimizer(fresh.engine, tmp_path / "a" / "checkpoint-1", "global_step1")
        loaded = param_digests(fresh.model)
        trained = [name for name, d in saved.items() if d["trainable"]]
        assert trained and all(before[n]["sha256"] != saved[n]["sha256"] for n in trained)  # the step changed them
        assert all(loaded[n]["sha256"] == saved[n]["sha256"] for n in trained)
        # The optimizer's fp32 copy holds the loaded weights: a step with lr 0 leaves them as they are.
        for group in fresh.engine.optimizer.param_groups:
            group["lr"] = 0.0
        metrics, _, _ = fresh.training_step()
        assert metrics["train/step_applied"] == 1.0 and param_digests(fresh.model) == loaded
        # Same world size: DeepSpeed's own ZeRO-3 loader, every torch.load forced weights-only.
        checkpointing.load_checkpoint(fresh.engine, tmp_path / "a" / "checkpoint-1", rank=0, world_size=1)
        assert param_digests(fresh.model) == saved
    finally:
        fresh.close()

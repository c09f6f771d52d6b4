"""Issue 30 item 7 (disk full, stalled rank, torchrun's root cause) and items 1-2 at the trainer: what the user sees
when a save hits ENOSPC, when weights are NaN at a save, when a rank stalls, and when a fresh run meets a used
folder."""

from __future__ import annotations

import errno
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from deepgen_rl import grpo_deepgen
from deepgen_rl.trainer import checkpointing, failure_budget
from deepgen_rl.trainer.divergence import TrainingDiverged
from deepgen_rl.trainer.heartbeat import Beat, Heartbeat, stall_report, watchdog_threshold
from deepgen_rl.trainer.run_folder import OutputDirInUseError
from deepgen_rl.core.worker_errors import is_peer_failure, recorded
from tests.test_run_folder import fake_checkpoint
from tests.test_trainer_inprocess import build
from tests.trainer_utils import ZERO2, tiny_run_flags

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class FullDiskEngine:
    """Writes part of its shard, then fails as DeepSpeed's torch.save does on a full disk."""

    device = "cpu"

    def save_checkpoint(self, folder, tag, exclude_frozen_parameters):
        (Path(folder) / tag).mkdir(parents=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_full_save_names_the_checkpoint_and_enospc_and_removes_its_temp_folder(tmp_path):
    fake_checkpoint(tmp_path, 2)
    state = checkpointing.TrainerState(global_step=3)
    with pytest.raises(checkpointing.CheckpointSaveError) as err:
        checkpointing.save_checkpoint(FullDiskEngine(), tmp_path, state, rank=0, renamer=True, save_total_limit=1)
    message = str(err.value)
    assert f"could not write {tmp_path / 'checkpoint-3'}" in message and "ENOSPC" in message
    assert "No space left on device" in message and "The disk is full" in message and "GiB free" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert not (tmp_path / "tmp-checkpoint-3").exists() and not (tmp_path / "checkpoint-3").exists()
    assert checkpointing.checkpoint_problems(tmp_path / "checkpoint-2") == []  # rotation did not run


@pytest.mark.timeout(300)
def test_trainer_save_faults_are_named_and_not_masked(process_group, tiny_paths, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    trainer = build(tiny_paths, out, max_steps=1, save_strategy="steps", save_steps=1)
    try:
        def full_disk(*args, **kwargs):
            raise ENOSPC

        monkeypatch.setattr(trainer.engine, "save_checkpoint", full_disk)
        monkeypatch.setattr(failure_budget.RunSummary, "write", full_disk)  # the disk stays full for the summary
        with caplog.at_level(logging.ERROR), pytest.raises(checkpointing.CheckpointSaveError) as err:
            trainer.train()
        # The save's error reaches the user, not the run_summary.json write in `finally`.
        assert f"could not write {out / 'checkpoint-1'}" in str(err.value) and "ENOSPC" in str(err.value)
        assert "could not write run_summary.json: OSError: [Errno 28] No space left on device" in caplog.text
        assert not (out / "tmp-checkpoint-1").exists()
        assert trainer.summary.stopped_because == str(err.value)

        # NaN weights are never saved: the save stops before writing anything.
        monkeypatch.undo()
        name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        trainer.state.global_step = 2
        with pytest.raises(TrainingDiverged) as diverged:
            trainer.save()
        assert f"at step 2 the trained weights hold NaN/inf ({name}" in str(diverged.value)
        assert not (out / "checkpoint-2").exists() and not (out / "tmp-checkpoint-2").exists()

        # The folder now holds this run's metrics.jsonl: a fresh start into it is refused before any step.
        trainer.state.global_step = 0
        with pytest.raises(OutputDirInUseError, match="--resume_from_checkpoint latest"):
            trainer.train()
    finally:
        trainer.close()


def test_entry_point_refuses_a_used_output_dir_before_loading_the_model(process_group, tiny_paths, tmp_path,
                                                                        monkeypatch, caplog):
    out = tmp_path / "run"
    fake_checkpoint(out, 3)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(grpo_deepgen, "build_trainer", no_model)
    with caplog.at_level(logging.ERROR):
        code = grpo_deepgen.main(tiny_run_flags(tiny_paths, out, deepspeed=str(ZERO2)))
    assert code == grpo_deepgen.EXIT_OUTPUT_DIR_IN_USE == 2
    assert "checkpoint-3" in caplog.text and "--overwrite_output_dir" in caplog.text
    assert (out / "checkpoint-3" / "latest").is_file()


def test_stall_report_names_the_rank_behind_and_where(tmp_path):
    now = 1_000_000.0
    beats = [Beat(0, "node0", 10, 5, "advantages", 40, now - 700), Beat(1, "node1", 11, 5, "rewards", 39, now - 900),
             Beat(2, "node1", 12, 5, "advantages", 40, now - 650)]
    report = stall_report(beats, now, stall_s=600)
    assert report.startswith("stalled rank(s): rank 1 (host node1, pid 11) is in phase 'rewards' of step 5")
    assert "(900 s)" in report and "rank(s) 0, 2 reached phase 'advantages' of step 5 and have waited 700 s" in report
    assert stall_report(beats, now - 200, stall_s=600) is None  # the others have waited only 500 s
    in_step = [Beat(r, "n", r, 5, "rewards", 39, now - 900) for r in range(2)]
    assert stall_report(in_step, now, stall_s=600) is None  # all in the same phase: nobody is behind


def test_heartbeat_files_and_watchdog_name_the_stalled_rank(tmp_path, caplog):
    stalled = Heartbeat(tmp_path, rank=1, world_size=2, stall_s=0.3, watch=False)
    stalled.beat("rewards", step=4)
    with caplog.at_level(logging.ERROR, logger="deepgen_rl.trainer.heartbeat"):
        leader = Heartbeat(tmp_path, rank=0, world_size=2, stall_s=0.3, watch=True)
        try:
            leader.beat("rewards", step=4)
            leader.beat("advantages", step=4)  # rank 0 waits in the all-gather for rank 1
            deadline = time.time() + 10
            while "stalled rank(s)" not in caplog.text and time.time() < deadline:
                time.sleep(0.1)
        finally:
            leader.close()
    record = json.loads((tmp_path / "heartbeats" / "rank-1.json").read_text())
    assert record["phase"] == "rewards" and record["step"] == 4 and record["rank"] == 1
    assert "rank 1 (host " in caplog.text and "is in phase 'rewards' of step 4" in caplog.text
    assert "rank(s) 0 reached phase 'advantages'" in caplog.text
    # A file of a rank beyond this run's world size (an earlier, larger run) is not a stalled rank.
    (tmp_path / "heartbeats" / "rank-7.json").write_text(json.dumps(
        {"rank": 7, "host": "h", "pid": 1, "step": 1, "phase": "start", "seq": 1, "time": 0.0}))
    stalled.beat("advantages")
    assert Heartbeat(tmp_path, rank=0, world_size=2, stall_s=0.3, watch=False).report() is None


def test_a_failed_run_reports_who_was_behind_at_once_and_the_watchdog_comes_before_the_timeout(tmp_path):
    stalled = Heartbeat(tmp_path, rank=1, world_size=2, stall_s=600, watch=False)
    leader = Heartbeat(tmp_path, rank=0, world_size=2, stall_s=600, watch=False)
    leader.beat("advantages", step=2)  # rank 0 is one phase ahead, for a moment only
    assert leader.report() is None  # the watchdog waits its threshold
    assert "rank 1 (host " in leader.report(min_wait_s=0.0)  # the failure path (e.g. a collective timeout) does not
    assert stalled.seq == 1
    # --ddp_timeout 60 s: the watchdog speaks at 30 s, before the timeout ends the run; 0 still means no watchdog.
    assert watchdog_threshold(600, 60) == 30 and watchdog_threshold(600, 1800) == 600
    assert watchdog_threshold(0, 60) == 0 and watchdog_threshold(600, None) == 600


def test_torchrun_root_cause_is_the_rank_that_failed_first_not_the_peer_it_took_down(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fail(message):
        raise RuntimeError(message)

    files = {}
    for rank, message in ((0, "could not write checkpoint-3: ENOSPC"),
                          (1, "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")):
        files[rank] = tmp_path / f"error_{rank}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[rank]))
        with pytest.raises(RuntimeError):
            recorded(lambda: fail(message))()
    # Both fail within the same second, as when rank 0's exit breaks rank 1's collective.
    stamps = {r: int(json.loads(f.read_text())["message"]["extraInfo"]["timestamp"]) for r, f in files.items()}
    assert stamps[1] >= stamps[0] + 1
    failures = {1: ProcessFailure(local_rank=1, pid=2, exitcode=1, error_file=str(files[1])),
                0: ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(files[0]))}
    rank, failure = ChildFailedError("deepgen_rl.grpo_deepgen", failures).get_first_failure()
    assert rank == 0 and "ENOSPC" in failure.message["message"]
    assert is_peer_failure(RuntimeError("Connection reset by peer")) and not is_peer_failure(ValueError("bad flag"))

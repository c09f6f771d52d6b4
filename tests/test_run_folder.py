"""Issue 30 items 2 and 3: an output folder belongs to one run, rotation keeps to the run's timeline, and a torn
metrics.jsonl line is dropped with a warning instead of crashing every resume. File operations only (no model)."""

from __future__ import annotations

import json
import logging
import zipfile

import pytest
import torch

from deepgen_rl.trainer import checkpointing, run_folder
from deepgen_rl.trainer.logging_utils import MetricsLogger, TrackerSettings, read_metrics


def fake_checkpoint(root, step: int, marker: str = "") -> None:
    """A checkpoint-N folder that passes checkpoint_problems: tag, trainer state, a readable model-states file."""
    folder = root / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "latest").write_text(f"global_step{step}")
    (folder / "trainer_state.json").write_text(checkpointing.TrainerState(global_step=step).to_json())
    torch.save({"marker": torch.tensor([step])}, folder / f"global_step{step}" / "mp_rank_00_model_states.pt")
    (folder / "owner.txt").write_text(marker)


def write_metrics(path, steps, marker="run1"):
    path.write_text("".join(json.dumps({"step": s, "run": marker}) + "\n" for s in steps))


def test_fresh_start_into_a_used_folder_stops_and_names_both_ways_on(tmp_path):
    fake_checkpoint(tmp_path, 1)
    write_metrics(tmp_path / "metrics.jsonl", [1])
    with pytest.raises(run_folder.OutputDirInUseError) as err:
        run_folder.claim_output_dir(tmp_path, overwrite=False, mover=True)
    message = str(err.value)
    assert str(tmp_path) in message and "checkpoint-1" in message and "metrics.jsonl" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert (tmp_path / "checkpoint-1" / "latest").is_file()  # nothing touched
    # A folder with only metrics (a run killed before its first checkpoint) is another run's too.
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    write_metrics(only_metrics / "metrics.jsonl", [1, 2])
    with pytest.raises(run_folder.OutputDirInUseError):
        run_folder.claim_output_dir(only_metrics, overwrite=False, mover=True)
    # An empty or unrelated folder is free.
    free = tmp_path / "free"
    free.mkdir()
    (free / "notes.txt").write_text("mine")
    assert run_folder.claim_output_dir(free, overwrite=False, mover=True) is None


def test_overwrite_output_dir_archives_and_deletes_nothing(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, marker=f"run1 step {step}")
    (tmp_path / "tmp-checkpoint-4").mkdir()
    write_metrics(tmp_path / "metrics.jsonl", [1, 2, 3])
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000001.png").write_bytes(b"png")
    (tmp_path / "run_summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's own file")

    archive = run_folder.claim_output_dir(tmp_path, overwrite=True, mover=True)

    assert archive is not None and archive.parent == tmp_path and archive.name.startswith("archived-")
    for step in (1, 2, 3):
        assert (archive / f"checkpoint-{step}" / "owner.txt").read_text() == f"run1 step {step}"
    assert (archive / "tmp-checkpoint-4").is_dir() and (archive / "samples" / "step_000001.png").is_file()
    assert [r["step"] for r in read_metrics(archive / "metrics.jsonl")] == [1, 2, 3]
    assert (archive / "run_summary.json").is_file()
    # The folder is free for the new run; the user's own file stays; 'latest' finds nothing of the old run.
    assert run_folder.earlier_run(tmp_path) == [] and (tmp_path / "notes.txt").read_text() == "the user's own file"
    assert checkpointing.newest_good_checkpoint(tmp_path) is None
    # A second overwrite in the same second gets its own archive.
    fake_checkpoint(tmp_path, 1, marker="run2")
    second = run_folder.claim_output_dir(tmp_path, overwrite=True, mover=True)
    assert second != archive and (second / "checkpoint-1" / "owner.txt").read_text() == "run2"


def test_non_moving_ranks_check_but_move_nothing(tmp_path):
    fake_checkpoint(tmp_path, 1)
    assert run_folder.claim_output_dir(tmp_path, overwrite=True, mover=False) is None
    assert (tmp_path / "checkpoint-1" / "latest").is_file()


def test_rotation_after_a_rollback_keeps_to_the_resumed_timeline(tmp_path):
    # The case: checkpoint-2/-4/-6 and --save_total_limit 3; resume from checkpoint-2, then save 3, 4, 5.
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, marker="old timeline")
    write_metrics(tmp_path / "metrics.jsonl", range(1, 7), marker="old timeline")
    abandoned = run_folder.abandon_newer(tmp_path, 2, mover=True)
    assert abandoned.name.startswith("abandoned-after-step-2-")
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    assert [r["step"] for r in read_metrics(abandoned / "metrics.jsonl")] == [3, 4, 5, 6]
    for step in (3, 4, 5):  # the resumed run's saves and their rotation (what save_checkpoint does after a rename)
        fake_checkpoint(tmp_path, step, marker="new timeline")
        checkpointing.rotate_checkpoints(tmp_path, 3, keep=tmp_path / f"checkpoint-{step}")
    kept = checkpointing.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert all((p / "owner.txt").read_text() == "new timeline" for p in kept)
    assert checkpointing.newest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert (abandoned / "checkpoint-6" / "owner.txt").read_text() == "old timeline"  # kept, named
    # Nothing newer: nothing moves.
    assert run_folder.abandon_newer(tmp_path, 5, mover=True) is None


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_resume_goes_on(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n{"step": 3, "rew')
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert f"{path} line 3 is not valid JSON" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, TrackerSettings(report_to=(), run_name="t"), is_main=True, resume_step=2)
        logger.log(3, {"reward/mean": 0.7})
        logger.close()
    assert f"{path} line 3 is not valid JSON" in caplog.text
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_fake_checkpoints_are_complete(tmp_path):
    # The helper above must build what list_checkpoints / checkpoint_problems accept, or the tests prove nothing.
    fake_checkpoint(tmp_path, 7)
    assert checkpointing.checkpoint_problems(tmp_path / "checkpoint-7") == []
    with zipfile.ZipFile(tmp_path / "checkpoint-7" / "global_step7" / "mp_rank_00_model_states.pt"):
        pass

"""Shared fixtures: tiny DeepGen parts written once per test session in the real on-disk layouts."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real DeepGen files (read-only) live beside the repository in shared/reference-data on the team's machines;
# a user's own clone does not have them, and tests that need them skip with this reason.
REFERENCE_DATA = REPO_ROOT.parent / "shared" / "reference-data"
REFERENCE_DATA_MISSING = f"reference data folder {REFERENCE_DATA} is absent (only on the team's machines)"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from deepgen_rl.model.tiny import save_tiny_deepgen

    return save_tiny_deepgen(tmp_path_factory.mktemp("tiny_deepgen"), seed=0)


class _BackgroundPretraining:
    """The tiny model pretrained on the synthetic prompt -> image task, made by the command users run (``python -m
    deepgen_rl.model.tiny --pretrain_steps N``, PretrainSettings' defaults) in a background process with one thread,
    only when DEEPGEN_RL_TEST_PRETRAINED names a folder to use instead of the shipped model.

    WHY in the background: pretraining takes ~4-5 min of one core; started as soon as collection shows a test
    needs it, it runs on the second core while the other tests run, instead of adding its time to the suite."""

    def __init__(self, root: Path) -> None:
        import subprocess
        import sys

        from deepgen_rl.model.tiny_pretrain import PretrainSettings

        self.root = root
        self.log = root.parent / f"{root.name}.log"
        command = [sys.executable, "-m", "deepgen_rl.model.tiny", "--output_dir", str(root),
                   "--pretrain_steps", str(PretrainSettings.steps), "--pretrain_vae_steps",
                   str(PretrainSettings.vae_steps)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                            stdout=log, stderr=subprocess.STDOUT)

    def wait(self):
        from deepgen_rl.model.tiny import TinyModelPaths

        returncode = self.process.wait()
        assert returncode == 0, f"pretraining failed (exit {returncode}):\n{self.log.read_text()[-3000:]}"
        return TinyModelPaths.under(self.root)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_PRETRAINING: list[_BackgroundPretraining] = []


# The pretrained tiny model ships in the repository (made by the command in its pretrain.json's recipe;
# tests/test_tiny_pretrain_curve.py checks that a short re-pretraining follows its recorded loss curve), so the
# suite does not spend ~4.5 min of a core recreating it.
SHIPPED_PRETRAINED = REPO_ROOT / "assets" / "tiny_pretrained"


# The files whose module fixtures run whole trainings (seconds of one core, measured serially on 2 cores): run
# first, so that under pytest-xdist (scripts/test.sh: 2 workers, one file each) no long file starts last while the
# other worker idles. Order only: every test still runs.
SLOW_FILES_FIRST = ("test_quickstart.py", "test_trainer_learning.py", "test_monitor_runs.py",  # 81, 78, 60+
                    "test_world_size_invariance.py", "test_tiny_pretrain_curve.py",  # 45+, 38
                    "test_trainer_distributed.py", "test_algorithms_inprocess.py", "test_checkpoint_safety.py",
                    "test_doc_commands.py", "test_ema.py", "test_convert.py", "test_eval_runner.py")


def slow_files_first(items: list) -> None:
    """Slow files first (SLOW_FILES_FIRST order), every file's tests kept together and in their own order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    order = {id(item): k for k, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only when a selected test needs it
def pytest_collection_modifyitems(session, config, items):
    slow_files_first(items)
    # DEEPGEN_RL_TEST_PRETRAINED=<folder>: use a pretrained model kept there instead of the shipped one, made in the
    # background by the CLI when the folder does not hold one with PretrainSettings' defaults (it is reused only
    # when it was made with the same settings).
    kept = os.environ.get("DEEPGEN_RL_TEST_PRETRAINED")
    if kept and any("pretrained_tiny_paths" in getattr(item, "fixturenames", ()) for item in items):
        root = Path(kept)
        root.parent.mkdir(parents=True, exist_ok=True)
        _PRETRAINING.append(_BackgroundPretraining(root))


def pytest_unconfigure(config):
    for job in _PRETRAINING:
        job.stop()


# Processes the interpreter itself keeps for its lifetime and ends at exit (not started by a test), and the
# pytest-xdist workers (execnet's bootstrap command line), which the controller shuts down after its own session
# end; each worker checks the processes its tests started at its own session end.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker",
                        "import sys;exec(eval(sys.stdin.readline()))")


# Inherited by every process the suite starts (unless a test builds an environment from nothing): finds the ones
# whose parent has exited too (orphans are re-parented to init, so they are no longer pytest's descendants).
SESSION_MARKER = "DEEPGEN_RL_TEST_SESSION"
os.environ[SESSION_MARKER] = str(os.getpid())


def _started_by(root_pid: int) -> dict[int, str]:
    """{pid: command line} of the live (non-zombie) processes that descend from ``root_pid`` or carry its session
    marker, read from /proc ({} where there is none)."""
    parents, commands, marked = {}, {}, set()
    marker = f"{SESSION_MARKER}={root_pid}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            stat = (entry / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X") or pid == root_pid:  # exited and waiting to be reaped: nothing runs
                continue
            parents[pid] = int(ppid)
            commands[pid] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except (OSError, ValueError, IndexError):  # gone while we looked, or not ours to read
            continue
    found, frontier = set(marked), {root_pid} | marked
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return {pid: commands[pid] for pid in found}


def _leftover_processes(root_pid: int, grace_s: float = 5.0) -> dict[int, str]:
    """Descendants still running after ``grace_s`` (a process told to stop may need a moment), helpers excepted."""
    import time

    deadline = time.monotonic() + grace_s
    while True:
        left = {pid: cmd for pid, cmd in _started_by(root_pid).items()
                if not any(helper in cmd for helper in _INTERPRETER_HELPERS)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Every process a test starts must be gone when its test ends (a leaked reward server held ~0.5 GB for hours):
    at the end of the session, a descendant of pytest still running is killed and fails the run, named."""
    import signal

    for job in _PRETRAINING:  # the session's own background job, not a test's
        job.stop()
    left = _leftover_processes(os.getpid())
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    message = (f"{len(left)} process(es) started by the tests outlived the test session (now killed); the test "
               f"that starts each must stop it:\n{lines}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def pretrained_tiny_paths():
    """Paths of the pretrained tiny model: the shipped one (``SHIPPED_PRETRAINED``), or the session's
    ``_BackgroundPretraining`` under DEEPGEN_RL_TEST_PRETRAINED (waits for it). Read-only: a test that writes
    copies it first."""
    from deepgen_rl.model.tiny import TinyModelPaths
    from deepgen_rl.model.tiny_pretrain import PretrainSettings, cached_record

    if _PRETRAINING:
        return _PRETRAINING[0].wait()
    assert cached_record(SHIPPED_PRETRAINED, PretrainSettings(), seed=0) is not None, (
        f"{SHIPPED_PRETRAINED} was not made with PretrainSettings' defaults: remake it with python -m "
        f"deepgen_rl.model.tiny --output_dir {SHIPPED_PRETRAINED.relative_to(REPO_ROOT)} --pretrain_steps "
        f"{PretrainSettings.steps} --pretrain_vae_steps {PretrainSettings.vae_steps}")
    return TinyModelPaths.under(SHIPPED_PRETRAINED)


@pytest.fixture()
def tiny_model_args(tiny_paths):
    """ModelArguments pointing at the tiny parts, as a user's exports + flags would."""
    return model_args_for(tiny_paths)


def model_args_for(paths):
    """float32 ModelArguments pointing at tiny parts written by model/tiny.py (untrained or pretrained)."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.tiny import TINY_MODEL_FLAGS

    return ModelArguments(
        sd3_model_name_or_path=str(paths.sd3_dir),
        qwen2_5_vl_model_name_or_path=str(paths.qwen_dir),
        checkpoint=str(paths.checkpoint),
        model_dtype="float32",
        **TINY_MODEL_FLAGS,
    )


@pytest.fixture(scope="session")
def published_config_paths(tmp_path_factory):
    """(sd3_dir, qwen_dir) holding the published Qwen2.5-VL-3B / SD3.5-Medium configs (no weights)."""
    from deepgen_rl.model.published_configs import write_published_configs

    return write_published_configs(tmp_path_factory.mktemp("published_configs"))


@pytest.fixture(scope="session")
def real_size_model(published_config_paths):
    """(ModelArguments, the joint model at real size on the meta device): built once, shared (tests that change
    requires_grad restore it; loading into meta parameters changes nothing)."""
    from deepgen_rl.config import ModelArguments
    from deepgen_rl.model.meta import build_deepgen_model_on_meta

    sd3, qwen = published_config_paths
    model_args = ModelArguments(sd3_model_name_or_path=str(sd3), qwen2_5_vl_model_name_or_path=str(qwen),
                                checkpoint="", model_dtype="bfloat16")
    return model_args, build_deepgen_model_on_meta(model_args)


@contextmanager
def _environment(values: dict):
    """Set ``values`` in os.environ, restoring the previous values (or their absence) afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def _one_process_group():
    """One one-process gloo group (DeepSpeed's ``init_distributed``) for the whole session, torn down once, through
    DeepSpeed, at the end. Shared on purpose: a group destroyed with ``torch.distributed.destroy_process_group``
    leaves DeepSpeed's cached groups pointing at it, and the next in-process engine fails ("Group ... is not
    registered"). Yields the rank environment it was made with."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    from tests.trainer_utils import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    created = not dist.is_initialized()
    if created:
        with _environment(env):
            deepspeed.init_distributed(dist_backend="gloo")
    assert dist.get_world_size() == 1
    yield env
    if created:
        deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def process_group(_one_process_group):
    """The session's one-process group, with its rank environment set for the module (as the entry point sees it
    outside torchrun) and removed afterwards, so later tests' subprocesses (train.sh, torchrun) do not inherit it."""
    with _environment(_one_process_group):
        yield

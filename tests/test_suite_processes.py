"""The suite's session-end check (tests/conftest.py): a process a test leaves running fails the run, is named and
is killed, whether it is still pytest's child or an orphan (its parent gone, re-parented to init)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

LEAKY_TESTS = '''
import subprocess
from pathlib import Path


def test_leaves_a_child(tmp_path):
    child = subprocess.Popen(["sleep", "311"])
    Path({pids!r}, "child").write_text(str(child.pid))


def test_leaves_an_orphan():
    # bash exits at once; its background sleep is re-parented away from pytest
    out = subprocess.run(["bash", "-c", "sleep 312 > /dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path({pids!r}, "orphan").write_text(out.stdout.strip())


def test_cleans_up():
    subprocess.run(["true"], check=True)
'''


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the check reads /proc (Linux)")
def test_a_leaked_child_or_orphan_fails_the_session_and_is_killed(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS.format(pids=str(pids)))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90)
    output = result.stdout + result.stderr
    assert "3 passed" in output  # the tests themselves pass: the session-end check fails the run
    assert result.returncode == 1, output
    assert "outlived the test session" in output and "sleep 311" in output and "sleep 312" in output
    child, orphan = int((pids / "child").read_text()), int((pids / "orphan").read_text())
    deadline = time.monotonic() + 5
    while (_running(child) or _running(orphan)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child) and not _running(orphan)

"""Start and stop real server processes on 127.0.0.1 for the reward tests (helpers, not tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).resolve().parent / "servers" / "fake_reward_server.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess; ``start`` waits until GET /health answers 200 (or fails with the server's log).

    Use it as ``with ServerProcess(...) as server`` or ``with ServerProcess(...).start(timeout_s=...) as server``:
    entering starts it only if it is not started yet. (Entering used to start a SECOND process after an explicit
    ``start()``; the first one, answering /health on the port, was never stopped and outlived the test session.)
    The server runs in its own process group (session), and ``stop`` ends the whole group, so a child it starts
    (a launcher script's python, a worker) goes with it.
    """

    def __init__(self, argv: Sequence[str], port: int, env: Optional[dict] = None) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.TemporaryFile()

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        if self.proc is not None:
            raise RuntimeError(f"server {self.argv} was already started (pid {self.proc.pid})")
        self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.argv} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server {self.argv} did not answer /health within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-4000:]

    def kill(self) -> None:
        """Hard kill (as a crash would) of this server's process group."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 10 s; then any child left in the group is killed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout=10)
            self._signal_group(signal.SIGKILL)  # a child that outlived its parent still carries the group id
        self._log.close()

    def _signal_group(self, sig: int) -> None:
        # The group id is the server's pid (start_new_session); it is ours alone, never a shell's or pytest's.
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=5.0).json()

    def __enter__(self) -> "ServerProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_server(*extra: str) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, str(FAKE_SERVER), "--port", str(port), *extra], port)


def ocr_server(*extra: str) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "deepgen_rl.rewards.servers.ocr", "--host", "127.0.0.1",
                          "--port", str(port), "--log-level", "warning", *extra], port)

"""Per-rank heartbeats, so a hung multi-rank run names the rank that stalled and where.

Without them a rank stuck in its reward call (or a dead NFS mount, a GPU hang) leaves every other rank waiting in
the next collective until --ddp_timeout (1800 s) ends the run with a timeout that names only the waiting ranks.
Each rank writes ``<output_dir>/heartbeats/rank-R.json`` at every phase boundary (a few small writes per step):

    {"rank": 1, "host": "node3", "pid": 4242, "step": 5, "phase": "rewards", "seq": 38, "time": 1700000000.0}

``seq`` counts the beats; all ranks pass the same phases in the same order, so a rank whose ``seq`` is below the
others' is behind them. Rank 0 runs a watchdog thread: once the leading ranks have waited --stall_report_s (at
most half of --ddp_timeout, so the report comes before the timeout) without the others catching up, it logs an error naming each rank behind, its host and pid, and the phase and
step it has been in since when (repeated every --stall_report_s). When a step fails (e.g. the collective timeout)
the report is logged whatever the wait. Ranks whose files rank 0 cannot see (node-local --output_dir) are left out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

HEARTBEAT_DIR = "heartbeats"


@dataclass(frozen=True)
class Beat:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    seq: int
    time: float


def read_beats(folder: Path) -> list[Beat]:
    """Every rank's last beat in ``folder`` (a file being replaced or unreadable is skipped)."""
    beats = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            beats.append(Beat(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return beats


def watchdog_threshold(stall_report_s: float, ddp_timeout_s: Optional[float]) -> float:
    """--stall_report_s, but at most half of --ddp_timeout: a collective timeout (or NCCL's abort) must not come
    first and end the run unexplained. 0 stays 0 (no watchdog)."""
    if stall_report_s <= 0 or not ddp_timeout_s:
        return stall_report_s
    return min(stall_report_s, ddp_timeout_s / 2)


def stall_report(beats: list[Beat], now: float, stall_s: float) -> Optional[str]:
    """The ranks behind the others once the leaders have waited ``stall_s`` seconds for them, else None."""
    if len(beats) < 2:
        return None
    lead = max(b.seq for b in beats)
    behind = [b for b in beats if b.seq < lead]
    waited = now - min(b.time for b in beats if b.seq == lead)
    if not behind or waited < stall_s:
        return None
    leaders = sorted(b.rank for b in beats if b.seq == lead)
    where = next(b for b in beats if b.seq == lead)
    stalled = "; ".join(
        f"rank {b.rank} (host {b.host}, pid {b.pid}) is in phase '{b.phase}' of step {b.step} since "
        f"{time.strftime('%H:%M:%S', time.localtime(b.time))} ({now - b.time:.0f} s)" for b in behind)
    return (f"stalled rank(s): {stalled}; rank(s) {', '.join(map(str, leaders))} reached phase '{where.phase}' of "
            f"step {where.step} and have waited {waited:.0f} s for them. Look at the stalled rank's log and "
            "process (py-spy dump --pid); the run ends at --ddp_timeout.")


class Heartbeat:
    """This rank's heartbeat file, and on rank 0 the watchdog over all of them (``close`` stops it)."""

    def __init__(self, output_dir: str | Path, rank: int, world_size: int, stall_s: float, *, watch: bool) -> None:
        self.folder = Path(output_dir) / HEARTBEAT_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.stall_s = rank, world_size, stall_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.seq, self.step = 0, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.beat("start")
        if watch and stall_s > 0:
            self._thread = threading.Thread(target=self._watch, name="heartbeat-watchdog", daemon=True)
            self._thread.start()

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        """Record that this rank entered ``phase`` (of ``step``; default: the last step given)."""
        self.seq += 1
        self.step = self.step if step is None else step
        record = {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": phase,
                  "seq": self.seq, "time": time.time()}
        path = self.folder / f"rank-{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)  # atomic: the watchdog never reads half a file
        except OSError as err:  # a heartbeat must never stop training (e.g. a full disk)
            logger.debug("heartbeat not written: %s", err)

    def report(self, min_wait_s: Optional[float] = None) -> Optional[str]:
        """The stall report once the leaders have waited ``min_wait_s`` (default: the watchdog's threshold; 0 when
        the run already failed, e.g. at --ddp_timeout, to say who the others were waiting for)."""
        # Files of ranks beyond this run's world size are an earlier, larger run's.
        beats = [b for b in read_beats(self.folder) if b.rank < self.world_size]
        return stall_report(beats, time.time(), self.stall_s if min_wait_s is None else min_wait_s)

    def _watch(self) -> None:
        interval = max(1.0, min(30.0, self.stall_s / 4))
        last_logged = 0.0
        while not self._stop.wait(interval):
            message = self.report()
            if message and time.time() - last_logged >= self.stall_s:
                logger.error("%s", message)
                last_logged = time.time()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

"""SIGTERM (preemption, ``scancel``, torchrun shutting down) -> finish the current step, checkpoint, exit 0.

The handler only sets a flag; the trainer checks it between steps. Ranks may receive the signal at different
moments, so the decision is all-reduced (MAX) once per step: every rank stops after the same step and takes
part in the same (collective) checkpoint save.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class GracefulStop:
    """Context manager installing the SIGTERM handler (main thread only); restores the previous one on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self._signals = signals
        self._previous: dict[int, object] = {}
        self.requested = False

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        del frame
        if not self.requested:
            logger.warning("received signal %d: finishing the current step, then checkpointing and exiting.", signum)
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        """Collective when torch.distributed is initialised: True on every rank if any rank was signalled."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

"""SIGTERM (preemption, ``scancel``, torchrun shutting down) -> stop at the next safe point, checkpoint, exit 0.

torchrun forwards SIGTERM to its workers and SIGKILLs them ``--shutdown_timeout`` seconds later (30 by default;
scripts/train.sh sets a longer one), while a real GRPO step takes minutes. So the trainer does not finish the
step: it checks the flag at safe points INSIDE the step (between phases and between training chunks, before the
optimizer step), abandons the step there, rewinds the data samplers and RNG to the step's start, and saves the
last completed step. The abandoned step is redone, identically, on resume.

The handler only sets a flag. Ranks may receive the signal at different moments, so every check is all-reduced
(MAX): all ranks stop at the same safe point and take part in the same (collective) checkpoint save.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Optional

import torch

from deepgen_rl.core.distributed import all_reduce_flag

logger = logging.getLogger(__name__)


class StepInterrupted(Exception):
    """Raised at a safe point inside a step when a stop was requested on any rank."""


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
            logger.warning("received signal %d: stopping at the next safe point of this step, checkpointing the last "
                           "completed step and exiting.", signum)
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        """Collective when torch.distributed is initialised: True on every rank if any rank was signalled."""
        return all_reduce_flag(self.requested, device, "max")

    def check(self, device: torch.device, where: str) -> None:
        """A safe point (collective): raise :class:`StepInterrupted` on every rank if any rank was signalled."""
        if self.should_stop(device):
            raise StepInterrupted(where)

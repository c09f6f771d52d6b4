"""torchrun's "Root Cause (first observed failure)" names the rank that failed on its own, not a bystander.

torchrun reports, as the root cause, the worker failure with the smallest timestamp; a worker only has an error
file (message, traceback, timestamp in whole seconds) when its entry point is wrapped in torch's ``record``. When
rank 0 fails (a full disk at a save, a bug), rank 1 waiting in a collective fails too, with a secondary gloo / NCCL
"Connection closed by peer" error, often in the same second: the summary then showed whichever came first in its
table. ``recorded`` wraps the entry point in ``record`` with a handler that writes a secondary error (a lost peer)
one second later, so the failure that caused it is the root cause.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What gloo / NCCL / the store say when ANOTHER process went away (this rank itself is fine).
PEER_FAILURE_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe",
                     "connection refused", "socket closed", "remote process exited", "nccl communicator was aborted")


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died (not a failure of this rank's own)."""
    from torch.distributed import DistNetworkError

    text = str(err).lower()
    return isinstance(err, DistNetworkError) or any(part in text for part in PEER_FAILURE_TEXT)


def recorded(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` under torch's ``record`` (error files for torchrun), secondary errors timed one second later."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

    class PeerAwareErrorHandler(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            super().record_exception(e)
            path = self._get_error_file_path()
            if not path or not is_peer_failure(e):
                return
            try:
                with open(path) as handle:
                    data = json.load(handle)
                info = data["message"]["extraInfo"]
                info["timestamp"] = str(int(info["timestamp"]) + 1)
                with open(path, "w") as handle:
                    json.dump(data, handle)
            except (OSError, ValueError, KeyError, TypeError) as err:  # the plain record stays
                logger.debug("could not re-time the error file %s: %s", path, err)

    return record(fn, error_handler=PeerAwareErrorHandler())

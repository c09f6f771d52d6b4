"""The OCR server's work queue: whole requests, one at a time, first in first out; a request whose client left is
dropped.

Why: OCR is CPU-bound and the engine reads one image at a time. With a thread per request contending for the
engine, requests advance image by image in turn, so every request in flight ends when the whole queue ends: with
a client timeout shorter than the queue, all of them time out together, and their images were read for nobody.
Served whole and in order, the first requests answer in time and only the tail waits; a request abandoned by its
client (timeout, crash) is removed from the queue, or stops after its current image when it is already running.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class QueueCounters:
    """Totals since the server started (``GET /stats``)."""

    requests_received: int = 0
    requests_completed: int = 0
    requests_dropped: int = 0  # abandoned by their client before their last image
    images_scored: int = 0
    images_dropped: int = 0  # never read because their request was abandoned
    queue_depth: int = 0  # requests waiting or running now


@dataclass
class Job(Generic[Item]):
    items: Sequence[Item]
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)


class FifoScorer(Generic[Item, Result]):
    """Runs ``score_one`` over each submitted request's items on ONE worker thread, requests in submission order."""

    def __init__(self, score_one: Callable[[Item], Result], images_in: Callable[[Item], int] = lambda item: 1,
                 thread_name: str = "ocr-fifo") -> None:
        # images_in: how many images one item holds (the model scorers queue batches of images as items).
        self._score_one = score_one
        self._images_in = images_in
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._lock = threading.Lock()
        self._counters = QueueCounters()

    def submit(self, items: Sequence[Item]) -> Job[Item]:
        job: Job[Item] = Job(items=items)
        with self._lock:
            self._counters.requests_received += 1
            self._counters.queue_depth += 1
            job.future = self._executor.submit(self._run, job)
        return job

    def abandon(self, job: Job[Item]) -> None:
        """The client left: drop the job if it has not started, else stop it after its current item."""
        job.abandoned.set()
        if job.future.cancel():  # still queued: the worker will never see it
            self._finish(dropped_items=sum(map(self._images_in, job.items)))

    def _run(self, job: Job[Item]) -> Optional[list[Result]]:
        results: list[Result] = []
        for item in job.items:
            if job.abandoned.is_set():
                self._finish(dropped_items=sum(map(self._images_in, job.items[len(results):])))
                return None
            results.append(self._score_one(item))
            with self._lock:
                self._counters.images_scored += self._images_in(item)
        self._finish(dropped_items=None)
        return results

    def _finish(self, dropped_items: Optional[int]) -> None:
        with self._lock:
            self._counters.queue_depth -= 1
            if dropped_items is None:
                self._counters.requests_completed += 1
            else:
                self._counters.requests_dropped += 1
                self._counters.images_dropped += dropped_items

    def counters(self) -> QueueCounters:
        with self._lock:
            return QueueCounters(**vars(self._counters))

    def close(self) -> None:
        """At shutdown: queued requests are dropped; a running one finishes its current image."""
        self._executor.shutdown(wait=False, cancel_futures=True)

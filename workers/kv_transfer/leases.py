"""Lease expiry for KV reservations: one daemon thread and a heap of deadlines (not a timer per request)."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class LeaseReaper:
    """One daemon thread that calls `expire(request_id)` when a lease's deadline passes."""

    def __init__(self, expire: Callable[[str], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, request_id: str, deadline: float) -> None:
        with self._cv:
            heapq.heappush(self._heap, (deadline, request_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-lease-reaper", daemon=True)
                self._thread.start()
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(timeout=None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                _, rid = heapq.heappop(self._heap)
            try:
                self._expire(rid)  # no-op when the request completed, failed or was re-reserved
            except Exception:  # pragma: no cover - never let the reaper die
                log.exception("lease expiry of %s failed", rid)

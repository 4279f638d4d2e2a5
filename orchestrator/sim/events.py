"""The event loop: a heap of timed events whose handlers return new events.

An event is `(time_s, seq, handler, arg)`. `seq` breaks ties in scheduling order, so two events
at the same instant run first-scheduled-first (the simulation is deterministic). A handler is
called as `handler(arg)` with the loop's `now_s` already set to the event's time and returns
None, one `(time_s, handler, arg)` triple, or a list of them. Scheduling into the past is an
internal error (`SimulationError`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator.core.types import TandemError, mypyc_attr

Handler = Callable[[Any], Any]


@mypyc_attr(native_class=False)
class SimulationError(TandemError, RuntimeError):
    """The simulation reached a state that should be impossible (a bug, not bad input)."""


class EventLoop:
    """A min-heap of events in simulated seconds."""

    __slots__ = ("_heap", "_seq", "now_s", "events_run", "pending_arrival")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Handler, Any]] = []
        self._seq = 0
        self.now_s = 0.0
        self.events_run = 0
        self.pending_arrival: Any = None  # the arrival run_merged drew but stopped before (until_s)

    def schedule(self, time_s: float, handler: Handler, arg: Any = None) -> None:
        """Run `handler(arg)` at `time_s` (>= now)."""
        if time_s < self.now_s:
            raise SimulationError(f"event scheduled at {time_s} s, before now ({self.now_s} s)")
        self._seq += 1
        heapq.heappush(self._heap, (time_s, self._seq, handler, arg))

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until_s: float = math.inf, progress: Callable[[float], None] | None = None,
            progress_every: int = 65536) -> float:
        """Run events in time order until the heap is empty or the next event is after `until_s`.

        Returns the time of the last event run. `progress(now_s)` is called every
        `progress_every` events (for a progress bar). (`run_merged` with no arrivals.)
        """
        return self.run_merged(iter(()), _no_arrival, _no_arrival, until_s, progress, progress_every)

    def run_merged(self, arrivals: Iterator[Any], on_arrival: Handler, time_of: Callable[[Any], float],
                   until_s: float = math.inf, progress: Callable[[float], None] | None = None,
                   progress_every: int = 65536) -> float:
        """`run`, with a time-ordered stream of arrivals merged in without passing through the heap.

        Each item `a` of `arrivals` is run as `on_arrival(a)` at `time_of(a)`. The first is drawn now
        and takes the next sequence number, as if scheduled now; each later one is drawn when the
        one before it runs and takes the sequence number it would have had as the first event that
        handler returned. So the order of events — ties included — is exactly that of `run` over
        the same events with each arrival's handler returning the next arrival first. Arrivals count
        in `events_run`. An arrival earlier than the one before it is a `SimulationError`. When
        `until_s` stops the run, the arrival drawn but not run is left in `pending_arrival`.
        """
        heap = self._heap
        pop = heapq.heappop
        push = heapq.heappush
        seq = self._seq
        a_seq = 0
        a_arg: Any = None
        draw = next  # (a local: no builtins lookup per arrival)
        nxt = draw(arrivals, None)
        if nxt is None:
            a_t = math.inf
        else:
            seq += 1
            a_t = time_of(nxt)
            a_arg = nxt
            a_seq = seq
            if a_t < self.now_s:
                raise SimulationError(f"arrival {a_arg!r} at {a_t} s, before now ({self.now_s} s)")
        n = 0
        while True:
            top = heap[0] if heap else None
            if top is not None and (a_t > top[0] or (a_t == top[0] and a_seq > top[1])):
                if top[0] > until_s:
                    break
                t, _, handler, arg = pop(heap)
                self.now_s = t
                self._seq = seq
                out = handler(arg)
                seq = self._seq
            elif nxt is not None:
                if a_t > until_s:
                    break
                t = a_t
                handler = on_arrival
                self.now_s = t
                self._seq = seq
                out = handler(a_arg)
                seq = self._seq
                nxt = draw(arrivals, None)
                if nxt is None:
                    a_t = math.inf
                else:
                    seq += 1
                    a_t = time_of(nxt)
                    a_arg = nxt
                    a_seq = seq
                    if a_t < t:
                        raise SimulationError(f"arrivals not in time order: {a_arg!r} at {a_t} s after one at {t} s")
            else:
                break
            n += 1
            if out is not None:
                if type(out) is tuple:
                    tt = out[0]
                    if tt < t:
                        raise SimulationError(f"handler {handler} returned an event at {tt} s < now {t} s")
                    seq += 1
                    push(heap, (tt, seq, out[1], out[2]))
                else:
                    for tt, h, a in out:
                        if tt < t:
                            raise SimulationError(f"handler {handler} returned an event at {tt} s < now {t} s")
                        seq += 1
                        push(heap, (tt, seq, h, a))
            if progress is not None and n % progress_every == 0:
                progress(t)
        self._seq = seq
        self.events_run += n
        self.pending_arrival = nxt
        return self.now_s


def _no_arrival(_: Any) -> Any:  # pragma: no cover - `run` passes no arrivals, so it is never called
    raise AssertionError("run() has no arrivals")

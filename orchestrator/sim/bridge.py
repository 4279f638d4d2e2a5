"""The seam between the simulator and the core: the live router and admission, fed a snapshot of
the simulated fleet, their decisions translated into worker indices for the event handlers.

What the bridge owns is driver mechanics only (the same the runtime's dispatcher must have):
- the `ClusterSnapshot` the router reads, built once and refreshed in place for the workers whose
  load changed since the last decision (`mark`); the workers whose fields did change are recorded in
  the snapshot's change log (`SnapshotChanges`), from which the core updates its ordered views of the
  fleet (`orchestrator.core.fleet_index`), so a decision costs O(changed workers), not O(fleet);
- the FIFO admission parks requests in (`QueueView` reads its per-class counts) and the rule for
  draining it, as the runtime's dispatcher does: whenever a request finishes, the head is offered
  to the router again, and the next, until one does not place.

Snapshot fields from a `SimWorker`:
    queued_prefill_tokens = prompt tokens queued + in the prefill batch in flight
    running_batch         = sequences in the decode batch
    waiting               = requests holding (or waiting for) blocks here but not yet decoding
    free_kv_blocks, total_kv_blocks, block_size as the worker's cache; power_w None (modelled).

The snapshot objects are frozen dataclasses; the bridge updates its own instances in place through
their instance dicts (nothing else holds them: the router is pure and keeps no reference). With
`record_route_calls` every router call is also logged with an independent copy of the snapshot —
the contract test replays that log through a separate dispatcher.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from typing import Any

from orchestrator.config.models import NoFitAction, TandemConfig
from orchestrator.core.admission import Admission, AdmissionAction, QueueView
from orchestrator.core.power import PowerAccountant
from orchestrator.core.router import RouteDecision, RouteEval, Router
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, SnapshotChanges, WorkerSnapshot
from orchestrator.sim.fleet import SimWorker
from orchestrator.sim.workload import SimRequest


def request_of(req: SimRequest) -> RouteRequest:
    """The RouteRequest the runtime would build for this request (id `r<n>`)."""
    return RouteRequest(f"r{req.request_id}", req.prompt_tokens, req.output_tokens, req.sla_class, req.arrival_s)


class CoreBridge:
    """Router + admission over a live view of the simulated fleet."""

    def __init__(self, config: TandemConfig, cost_model: Any, power: PowerAccountant,
                 workers: list[SimWorker], *, record_route_calls: bool = False) -> None:
        self.config = config
        self.router = Router(config, cost_model, power=power)
        self.admission = Admission(config, self.router)
        self.link = self.router.estimator.link
        self.workers = workers
        self._index = {w.worker_id: w.index for w in workers}
        for w in workers:
            w.snapshot = WorkerSnapshot(w.worker_id, w.pool, w.role, w.hardware, True, 0, 0, 0, w.free_blocks,
                                        w.total_blocks, w.block_size, None)
        self.changes = SnapshotChanges()  # tells the core which workers `refresh` changed
        self.snapshot = ClusterSnapshot(tuple(w.snapshot for w in workers), 0.0, changes=self.changes)
        if [s.worker_id for s in self.snapshot.workers] != [w.worker_id for w in workers]:
            raise AssertionError("workers must be sorted by worker_id")
        self._dirty: set[SimWorker] = set(workers)
        self.queue: deque[tuple[SimRequest, RouteRequest, str]] = deque()  # admission's FIFO
        self._waiting: dict[str, int] = {c.name: 0 for c in config.sla.classes}  # per class, kept in step
        self.queue_view = QueueView(self._waiting)  # reads the live counts
        self.route_calls: list[tuple[ClusterSnapshot, RouteRequest, RouteDecision]] | None = (
            [] if record_route_calls else None)
        self.admission_reasons: dict[str, int] = {}

    # ------------------------------------------------------------------ snapshot upkeep

    def mark(self, w: SimWorker) -> None:
        self._dirty.add(w)

    def refresh(self, now_s: float) -> ClusterSnapshot:
        """Bring the snapshot up to date (only the workers marked since the last call)."""
        record = self.changes.record
        for w in self._dirty:
            s: dict[str, Any] = w.snapshot.__dict__  # (the frozen dataclass's fields, written without __setattr__)
            q = w.prefill_q_tokens + w.batch_tokens
            r = w.num_running
            wait = w.pending + len(w.reserve_q)
            free = w.free_blocks
            if (s["queued_prefill_tokens"] != q or s["running_batch"] != r or s["waiting"] != wait
                    or s["free_kv_blocks"] != free):
                s["queued_prefill_tokens"] = q
                s["running_batch"] = r
                s["waiting"] = wait
                s["free_kv_blocks"] = free
                record(w.index)
        self._dirty.clear()
        self.snapshot.__dict__["time_s"] = now_s
        return self.snapshot

    def _route(self, rreq: RouteRequest, now_s: float, evaluation: RouteEval | None = None) -> RouteDecision:
        snap = self.refresh(now_s)
        decision = self.router.route(rreq, snap, evaluation)
        if self.route_calls is not None:
            self._record(snap, rreq, decision)
        return decision

    def _record(self, snap: ClusterSnapshot, rreq: RouteRequest, decision: RouteDecision) -> None:
        assert self.route_calls is not None
        frozen = ClusterSnapshot(tuple(dataclasses.replace(w) for w in snap.workers), snap.time_s)
        self.route_calls.append((frozen, rreq, decision))

    # ------------------------------------------------------------------ decisions
    # The same sequence as orchestrator/runtime/dispatcher.py (RayDispatcher.submit / _not_placed /
    # _pump): admission, then the router; a request the router cannot place now waits in one FIFO
    # (bounded by admission's caps); the FIFO is pumped whenever a request finishes.

    def offer(self, req: SimRequest, now_s: float) -> tuple[str, Any]:
        """Admission then routing for a newly arrived request.

        Returns ("placed", (decode index, prefill index or -1, reason)), ("queued", reason) or
        ("rejected", reason).
        """
        rreq = request_of(req)
        snap = self.refresh(now_s)
        adm = self.admission.decide(rreq, snap, self.queue_view)
        action = adm.action
        if action is AdmissionAction.ADMIT:
            # nothing changed since admission evaluated the request: the router reuses that
            d = self.router.route(rreq, snap, self.admission.last_evaluation)
            if self.route_calls is not None:
                self._record(snap, rreq, d)
            if d.decode_worker_id is not None:
                return "placed", self._placement(d)
            if d.no_fit is NoFitAction.REJECT:
                return "rejected", d.reason.value
            adm = self.admission.queue_for_power(rreq, self.queue_view, d.arithmetic)
            if adm.action is AdmissionAction.REJECT:
                return "rejected", adm.reason.value
        elif action is AdmissionAction.REJECT:
            return "rejected", adm.reason.value
        name = adm.sla_class or self.config.sla.default
        self.queue.append((req, rreq, name))
        self._waiting[name] = self._waiting.get(name, 0) + 1
        return "queued", adm.reason.value

    def _placement(self, d: RouteDecision) -> tuple[int, int, str]:
        di = self._index[d.decode_worker_id]  # type: ignore[index]
        pi = -1 if d.prefill_worker_id is None else self._index[d.prefill_worker_id]
        return di, pi, d.reason._value_  # (= .value, without the enum property's Python-level getter)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def drain(self, now_s: float) -> Iterator[tuple[SimRequest, str, Any]]:
        """Place queued requests, FIFO, while the router can: yields (request, "placed", placement)
        for each request that leaves the queue, in order.

        A generator on purpose: the caller dispatches each placement (taking its blocks, prefill
        tokens and hence modelled power) before the router is asked about the next request, exactly
        as the runtime's dispatcher pumps its queue. Routing the whole queue against one snapshot
        would let a single finish release more requests than the power cap or the KV room allows."""
        q = self.queue
        while q:
            req, rreq, name = q[0]
            d = self._route(rreq, now_s)
            if not d.placed:
                break
            q.popleft()
            self._waiting[name] -= 1
            yield (req, "placed", self._placement(d))

    def abandon(self) -> list[SimRequest]:
        """Empty the queue (end of run): the requests that were never placed."""
        out = [req for req, _, _ in self.queue]
        self.queue.clear()
        for name in self._waiting:
            self._waiting[name] = 0
        return out

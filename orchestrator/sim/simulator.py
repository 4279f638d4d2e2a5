"""The simulator: turns the core's decisions into timed events over a simulated fleet.

A request's life, as events (times from the core's cost model, decisions from the core's
admission and router through `orchestrator.sim.bridge`):

    arrival ── admission: reject → done (rejected) │ queue → arrival again after retry_after_s
            └─ admit → router: (decode worker, prefill worker or local)
                 → the decode worker reserves KV blocks for prompt + output tokens
                   (FIFO wait while it has too few free blocks; a request larger than the whole
                   cache is rejected as `kv_capacity`)
                 → remote: prefill worker queue → prefill batch → KV transfer (exposed part) → decode
                   local: the decode worker's own prefill queue → prefill batch → decode
    decode worker, at each iteration boundary: sequences whose KV arrived join the batch; pending
    local prefills run first (one prefill batch, no chunking); otherwise one decode step for the
    whole batch, each sequence emitting one token. The first decode step after joining emits
    the first token (TTFT = queueing + prefill + exposed transfer + first step).
    A sequence that has emitted `output_tokens` tokens leaves and frees its blocks at that step.

Nothing here chooses a worker, an order of admission or a threshold: those are the core's. The
simulator owns only mechanics: queues, batch formation limits from the config (max batch size,
prefill token budget), block accounting, and time.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from typing import Any, Final, Protocol

from orchestrator.core.types import Role
from orchestrator.sim.events import EventLoop, SimulationError
from orchestrator.sim.fleet import FleetPower, SimWorker, WorkerPhase
from orchestrator.sim.report import Recorder, SimReport
from orchestrator.sim.workload import SimRequest

_ARRIVAL_S = attrgetter("arrival_s")
_MEMO_MAX: Final = 100_000  # entries of a worker's prefill-time memo before it is cleared
_EXACT_INT: Final = 1 << 53  # integers below this are exact floats
_PREFILL_ROLE: Final = Role.PREFILL  # (one global read instead of two lookups; a static when compiled)
RUN_STEPS = 64  # most decode steps computed ahead in one event (a run ends early at a finish or an arrival)


class Decisions(Protocol):
    """What the simulator asks the core (implemented by `orchestrator.sim.bridge.CoreBridge`)."""

    def offer(self, req: SimRequest, now_s: float) -> tuple[str, Any]:
        """Admission + routing of an arrival: ("placed", (decode index, prefill index or -1, reason)),
        ("queued", reason) or ("rejected", reason)."""
        ...

    def drain(self, now_s: float) -> Iterable[tuple[SimRequest, str, Any]]:
        """Queued requests that can now be placed (or must be rejected), in order; each is dispatched
        before the next is routed (so an implementation may be a generator)."""
        ...

    @property
    def queued(self) -> int:
        """Requests parked by admission."""
        ...

    def mark(self, worker: SimWorker) -> None:
        """The worker's load changed (its snapshot must be refreshed before the next decision)."""
        ...

    def abandon(self) -> list[SimRequest]:
        """At the end of a run: take back every request still parked by admission."""
        ...


class CostFns(Protocol):
    """The cost-model calls the event handlers make (`orchestrator.sim.costs.SimCosts`)."""

    def prefill_batch_time_s(self, hw: Any, token_counts: list[int], *, linear_mode: Any) -> float: ...

    def decode_step_time_totals_s(self, hw: Any, batch: int, total_context: int, *, linear_mode: Any,
                                  kv_dtype: Any) -> float: ...

    def step_coefficients(self, hw: Any, batch: int, *, linear_mode: Any,
                          kv_dtype: Any) -> tuple[float, float, float, float, int]: ...

    def step_plan(self, hw: Any, batch: int, *, linear_mode: Any,
                  kv_dtype: Any) -> tuple[float, float, float, float, int, bool]: ...

    @property
    def attention_flops_per_context_token(self) -> float: ...

    def exposed_transfer_time_s(self, hw_prefill: Any, num_tokens: int, kv_dtype: Any, link: Any = None,
                                *, linear_mode: Any) -> float: ...


class Simulator:
    """One run: a fleet, the core's decisions, the cost model, and a workload."""

    def __init__(self, workers: list[SimWorker], decisions: Decisions, cost: CostFns,
                 sla_of: Callable[[str | None], tuple[float, float]], *, power_bucket_s: float = 1.0,
                 record_timeline: bool = False, record_decisions: bool = False, link: Any = None) -> None:
        self.workers = workers
        self.link = link  # the prefill→decode link (None: the catalog's default)
        self.decisions = decisions
        self.cost = cost
        self.loop = EventLoop()
        self.fleet_power = FleetPower(power_bucket_s, record_timeline)
        self.recorder = Recorder(sla_of)
        self.decision_log: list[tuple[int, int, int, str]] | None = [] if record_decisions else None
        self._arrivals: Iterator[SimRequest] | None = None
        self.arrived = 0
        self.in_flight = 0

    # ------------------------------------------------------------------ driver

    def run(self, requests: Iterable[SimRequest], *, until_s: float = math.inf,
            progress: Callable[[float, int], None] | None = None) -> SimReport:
        """Replay the requests to completion (or until `until_s`) and return the report."""
        self._arrivals = iter(requests)
        self.fleet_power.start(0.0, sum(w.power_w for w in self.workers))
        cb = None if progress is None else (lambda t: progress(t, self.arrived))
        # arrivals are merged into the event order without passing through the heap (the same order
        # as if each arrival's handler scheduled the next one first, which `_on_arrival` does)
        end = self.loop.run_merged(self._arrivals, self._arrive, _ARRIVAL_S, until_s, cb)
        if not self.loop._heap and self.loop.pending_arrival is None:
            # ran to completion: what admission still holds was never placed
            for req in self.decisions.abandon():
                self.recorder.rejected(req, "never_placed")
                self.in_flight -= 1
        for w in self.workers:
            w.close(end)
        self.fleet_power.advance(end)
        return self.recorder.report(self, end)

    def _next_arrival(self) -> tuple[float, Callable[[Any], Any], Any] | None:
        assert self._arrivals is not None
        req = next(self._arrivals, None)
        if req is None:
            return None
        if req.arrival_s < self.loop.now_s:
            raise SimulationError(f"workload not in arrival order at request {req.request_id}")
        return (req.arrival_s, self._on_arrival, req)

    # ------------------------------------------------------------------ handlers (return new events)

    def _on_arrival(self, req: SimRequest) -> list:
        """An arrival as an event handler that schedules the next arrival itself (first)."""
        nxt = self._next_arrival()
        out = self._arrive(req)
        return out if nxt is None else [nxt, *out]

    def _arrive(self, req: SimRequest) -> list:
        """Admission and routing of an arrival (`run` merges arrivals into the event order)."""
        t = self.loop.now_s
        out: list = []
        self.arrived += 1
        self.in_flight += 1
        status, info = self.decisions.offer(req, t)
        if status == "placed":
            self._dispatch(req, info, t, out)
        elif status == "rejected":
            self.recorder.rejected(req, info)
            self.in_flight -= 1
        else:
            self.recorder.queued_by_admission += 1
        return out

    def _drain_admission(self, t: float, out: list) -> None:
        for req, status, info in self.decisions.drain(t):
            if status == "placed":
                self._dispatch(req, info, t, out)
            else:
                self.recorder.rejected(req, info)
                self.in_flight -= 1

    def _dispatch(self, req: SimRequest, placement: tuple[int, int, str], t: float, out: list) -> None:
        d_idx, p_idx, reason = placement
        if self.decision_log is not None:
            self.decision_log.append((req.request_id, d_idx, p_idx, reason))
        self.recorder.decided(reason)
        d = self.workers[d_idx]
        req.decode_worker = d
        req.prefill_worker = self.workers[p_idx] if p_idx >= 0 else None
        req.reason = reason
        need = -(-(req.prompt_tokens + req.output_tokens) // d.block_size)  # d.blocks_for(...)
        if need > d.total_blocks:
            self.recorder.rejected(req, "kv_capacity")
            self.in_flight -= 1
            return
        req.blocks = need
        d.pending += 1
        if not d.reserve_q and d.free_blocks >= need:
            self._reserved(req, t, out)
        else:
            req.mark_s = t
            d.reserve_q.append(req)
            if len(d.reserve_q) > d.max_reserve_q:
                d.max_reserve_q = len(d.reserve_q)
            self.decisions.mark(d)

    def _reserved(self, req: SimRequest, t: float, out: list) -> None:
        d: SimWorker = req.decode_worker  # (typed locals: native attribute access when compiled)
        d.free_blocks -= req.blocks
        self.decisions.mark(d)
        p: SimWorker = req.prefill_worker or d
        req.mark_s = t
        p.prefill_q.append(req)
        p.prefill_q_tokens += req.prompt_tokens
        if len(p.prefill_q) > p.max_prefill_q:
            p.max_prefill_q = len(p.prefill_q)
        if p is not d:
            self.decisions.mark(p)
        if p.phase is WorkerPhase.IDLE:
            ev = self._iterate(p, t)
            if ev is not None:
                out.append(ev)
        elif p.phase is WorkerPhase.DECODE and p.num_running + len(p.ready) < p.max_num_seqs:
            self._cut_run(p, t)

    def _on_prefill_done(self, w: SimWorker) -> list:
        t = self.loop.now_s
        out: list = []
        batch = w.batch
        w.batch = []
        w.batch_tokens = 0
        memo = w.transfer_memo  # per worker (its hardware, KV dtype, linear mode; the run's link): by tokens
        for req in batch:
            d = req.decode_worker
            if d is w:
                w.ready.append(req)
            else:
                dt = memo.get(req.prompt_tokens)
                if dt is None:
                    if len(memo) > _MEMO_MAX:
                        memo.clear()
                    dt = memo[req.prompt_tokens] = self.cost.exposed_transfer_time_s(
                        w.hardware, req.prompt_tokens, w.kv_dtype, self.link, linear_mode=w.linear_mode)
                out.append((t + dt, self._on_kv_arrived, req))
        ev = self._iterate(w, t)
        if ev is not None:
            out.append(ev)
        self.decisions.mark(w)
        return out

    def _on_kv_arrived(self, req: SimRequest) -> tuple | None:
        d: SimWorker = req.decode_worker
        d.ready.append(req)
        if d.phase is WorkerPhase.IDLE:
            return self._iterate(d, self.loop.now_s)
        if d.phase is WorkerPhase.DECODE and d.num_running < d.max_num_seqs:
            self._cut_run(d, self.loop.now_s)
        return None

    def _on_step_done(self, arg: tuple[SimWorker, int]) -> list | tuple | None:
        w, version = arg
        if version != w.run_version:
            return None  # this run was cut short; its replacement event ends it
        t = self.loop.now_s
        bounds = w.run_bounds
        k = len(bounds)
        if k == w.run_len and k < RUN_STEPS:
            w.run_len = k * 2  # ran to the end: look further ahead next time
        w.step += k
        step = w.step
        w.tokens_out += w.num_running * k
        w.decode_steps += k
        if w.new_joined:
            first = bounds[0]
            for req in w.new_joined:
                req.first_token_s = first
            w.new_joined = []
        heap = w.finish_heap
        if heap[0][0] <= step:
            out: list = []
            rec = self.recorder
            pop = heapq.heappop
            while heap and heap[0][0] <= step:
                req = pop(heap)[2]
                w.num_running -= 1
                w.sum_bases -= req.prompt_tokens - req.join_step
                req.finish_s = t
                w.free_blocks += req.blocks
                rec.finished(req)
                self.in_flight -= 1
            self._drain_reserve(w, t, out)
            self.decisions.mark(w)
            ev = self._iterate(w, t)
            if self.decisions.queued:
                self._drain_admission(t, out)
            if ev is not None:
                out.append(ev)
            return out
        return self._iterate(w, t)  # no finish: the batch goes on (or a local prefill runs first)

    # ------------------------------------------------------------------ mechanics

    def _drain_reserve(self, d: SimWorker, t: float, out: list) -> None:
        q = d.reserve_q
        while q and q[0].blocks <= d.free_blocks:
            req = q.popleft()
            d.reserve_wait_s += t - req.mark_s
            d.reserve_waits += 1
            self._reserved(req, t, out)

    def _iterate(self, w: SimWorker, t: float) -> tuple | None:
        """Start the worker's next iteration at time t; the event that ends it, or None (idle)."""
        if w.ready:
            room = w.max_num_seqs - w.num_running
            if room > 0:
                take = w.ready[:room]
                del w.ready[:room]
                step = w.step
                push = heapq.heappush
                heap = w.finish_heap
                for req in take:
                    req.join_step = step
                    w.sum_bases += req.prompt_tokens - step
                    push(heap, (step + req.output_tokens, req.request_id, req))
                w.num_running += len(take)
                w.pending -= len(take)
                w.new_joined.extend(take)
        q = w.prefill_q
        if q and (w.role is _PREFILL_ROLE or w.num_running + len(w.ready) < w.max_num_seqs):
            budget = w.max_batch_tokens
            limit = (1 << 30) if w.role is _PREFILL_ROLE else w.max_num_seqs - w.num_running - len(w.ready)
            req = q.popleft()
            batch = [req]
            tokens = req.prompt_tokens
            wait = t - req.mark_s
            while q and len(batch) < limit and tokens + q[0].prompt_tokens <= budget:
                req = q.popleft()
                batch.append(req)
                tokens += req.prompt_tokens
                wait += t - req.mark_s
            w.prefill_q_tokens -= tokens
            w.batch_tokens = tokens
            w.prefill_wait_s += wait
            w.prefill_waits += len(batch)
            w.batch = batch
            w.prefill_batches += 1
            w.prefill_tokens += tokens
            if len(batch) == 1:  # memoised per worker: the same call, the same answer
                dt = w.prefill_memo.get(tokens)
                if dt is None:
                    if len(w.prefill_memo) > _MEMO_MAX:
                        w.prefill_memo.clear()
                    dt = w.prefill_memo[tokens] = self.cost.prefill_batch_time_s(
                        w.hardware, [tokens], linear_mode=w.linear_mode)
            else:
                dt = self.cost.prefill_batch_time_s(w.hardware, [r.prompt_tokens for r in batch],
                                                    linear_mode=w.linear_mode)
            if w.phase is not WorkerPhase.PREFILL:
                w.set_phase(t, WorkerPhase.PREFILL, self.fleet_power)
            return (t + dt, self._on_prefill_done, w)
        n = w.num_running
        if n:
            # A run of decode steps up to the next finish (at most RUN_STEPS): the batch cannot
            # change before then unless something arrives, and `_cut_run` ends the run at the
            # step boundary after that arrival — the same boundaries as one event per step.
            k = w.finish_heap[0][0] - w.step
            if k > w.run_len:
                k = w.run_len
            ctx = w.sum_bases + n * w.step
            # cost.decode_step_time_totals_s inlined (same terms, same order: the same floats)
            plan = w.step_plans.get(n)
            if plan is None:
                plan = w.step_plans[n] = self.cost.step_plan(w.hardware, n, linear_mode=w.linear_mode,
                                                             kv_dtype=w.kv_dtype)
            head, elem, flops_s, bytes_s, kv_bytes, memory_bound = plan
            if memory_bound and kv_bytes * (ctx + n * (k + 1)) < _EXACT_INT:
                # the attention term is the memory one at every step (SimCosts.step_plan): step j
                # reads kv_bytes·(ctx + (j+1)·n) bytes; the ints are exact, the floats the same
                # (exact: integers below 2**53 are exact floats, and so are their sums)
                kn = float(kv_bytes * n)
                x = float(kv_bytes * (ctx + n))
                bounds = [0.0] * k  # (filled by index: as fast as an append in CPython, native compiled)
                tt = t
                for j in range(k):
                    tt += head + x / bytes_s + elem
                    bounds[j] = tt
                    x += kn
            else:
                per_ctx = self.cost.attention_flops_per_context_token
                bounds = [0.0] * k
                tt = t
                for j in range(k):
                    compute = per_ctx * ctx / flops_s
                    memory = kv_bytes * (ctx + n) / bytes_s
                    tt += head + (compute if compute > memory else memory) + elem
                    bounds[j] = tt
                    ctx += n
            w.run_bounds = bounds
            w.run_version += 1
            if w.phase is not WorkerPhase.DECODE:  # (set_phase does nothing then: skip the call)
                w.set_phase(t, WorkerPhase.DECODE, self.fleet_power)
            return (tt, self._on_step_done, (w, w.run_version))
        if w.phase is not WorkerPhase.IDLE:
            w.set_phase(t, WorkerPhase.IDLE, self.fleet_power)
        return None

    def _cut_run(self, w: SimWorker, t: float) -> None:
        """End the worker's decode run at the first step boundary at or after t."""
        bounds = w.run_bounds
        i = bisect.bisect_left(bounds, t)
        if i < len(bounds) - 1:
            del bounds[i + 1:]
            w.run_version += 1
            # (run_len is not shortened after a cut: a step computed in vain costs ~1/25 of the
            # event a shorter run would need later; measured in orchestrator/sim/README.md)
            self.loop.schedule(bounds[i], self._on_step_done, (w, w.run_version))

    # ------------------------------------------------------------------ checks

    def leak_report(self) -> list[str]:
        """Everything still held after a run to completion (empty = nothing leaked)."""
        out = [msg for w in self.workers for msg in w.leak_report()]
        if self.in_flight:
            out.append(f"{self.in_flight} requests neither finished nor rejected")
        return out

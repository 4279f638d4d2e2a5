"""The live dispatcher: core's admission and router decisions turned into Ray calls (a ServingBackend).

Per request (asyncio, in the frontend's event loop):

    admission.decide ─► REJECT: 429 (Retry-After) / 400 / 503
                     ─► QUEUE: wait in FIFO (bounded by core's caps) until the router can place it
                     ─► ADMIT: router.route ─► placed ─► dispatch
    dispatch, remote prefill: decode.reserve (KV lease) ─► prefill.prefill_to(decode's KV address)
                              (KV streams layer by layer over gRPC; the decode worker starts decoding
                              when the last layer lands)
    dispatch, local prefill:  decode.submit_local
    then: decode.drain long-polls stream tokens back; the end frees the ledger and wakes the queue.
    cancel (client gone): decode.cancel + prefill.cancel free the blocks on both workers.

The router reads a `ClusterSnapshot` built from two sources: this dispatcher's ledger of what it has
placed (exact and never stale, as this dispatcher is the only client of its workers) and polled worker
telemetry (health, live power). The ledger follows `WorkerSnapshot`'s definitions — the same ones the
simulator keeps (orchestrator/sim/bridge.py), so both feed the router the same numbers:

    queued_prefill_tokens  prompt tokens placed for prefill on this worker and not yet prefilled:
                           remote prefill on the prefill worker, from placement until `prefill_to`
                           returns; local prefill on the decode worker, from placement until a drain
                           frame says `"prefilled": True` or the request starts decoding
    running_batch          sequences decoding here: from the decode worker's first sign of decoding
                           (a drain frame with `"decoding": True`, or the first tokens) to the finish
    waiting                requests holding KV blocks here that are not decoding yet
    free_kv_blocks         total − blocks held by every request placed here (reserved at placement)

Capacity is given back when a request finishes or is cancelled; the FIFO of queued requests is
pumped once per event-loop pass after that, so requests finishing together free their capacity
before the router looks again (as the simulator frees a whole decode step before it drains).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.models import TandemConfig
from orchestrator.core.admission import (
    Admission,
    AdmissionAction,
    AdmissionDecision,
    AdmissionReason,
    QueueView,
)
from orchestrator.core.metrics import DecisionCounters
from orchestrator.core.router import RouteDecision, Router
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, WorkerSnapshot, blocks_for
from orchestrator.core.types import Role, TandemError
from orchestrator.runtime.api_types import (
    BackendUnavailable,
    GenerationRequest,
    InvalidRequestError,
    Overloaded,
    RequestFailed,
)
from orchestrator.runtime.deployment import Deployment, WorkerHandle
from orchestrator.runtime.metrics import TandemMetrics
from orchestrator.runtime.stream import RayStream, _err

log = logging.getLogger(__name__)

TELEMETRY_PERIOD_S = 0.25
QUEUE_TIMEOUT_S = 60.0  # a queued request not placed by then gets 429 (e.g. its capacity never came back)


def make_router(config: TandemConfig) -> Router:
    """The core router over the shipped hardware catalog and the config's model shape."""
    from orchestrator.core.cost_model import CostModel
    from orchestrator.core.hardware import HardwareCatalog
    from orchestrator.core.model_shape import get_shape

    return Router(config, CostModel(get_shape(config.model.shape_name), HardwareCatalog.load_default()))


@dataclass
class _Waiter:
    req: RouteRequest
    gen: GenerationRequest
    sla_class: str
    future: asyncio.Future[RouteDecision]


@dataclass
class _Ledger:
    """What this dispatcher has placed on one worker."""

    blocks: dict[str, int] = field(default_factory=dict)  # decode-capable: rid → KV blocks held
    prefill_tokens: dict[str, int] = field(default_factory=dict)  # rid → prompt tokens to prefill here
    not_decoding: set[str] = field(default_factory=set)  # rids holding blocks here, not decoding yet


class RayDispatcher:
    """ServingBackend over a `Deployment`. Use from one asyncio event loop (the HTTP server's)."""

    def __init__(self, config: TandemConfig, deployment: Deployment, metrics: TandemMetrics | None = None,
                 router: Router | None = None, *, clock: Callable[[], float] = time.monotonic,
                 record_routes: bool = False) -> None:
        """`clock` stamps snapshots and arrivals (tests inject a simulated one); with `record_routes`
        every router decision is appended to `route_log`, in order."""
        self.config = config
        self.clock = clock
        self.route_log: list[RouteDecision] | None = [] if record_routes else None
        self._pump_soon = False
        self.deployment = deployment
        self.metrics = metrics or TandemMetrics(config.served_model_name)
        self.router = router or make_router(config)
        self.admission = Admission(config, self.router)
        self.counters = DecisionCounters()
        self._ledger = {wid: _Ledger() for wid in deployment.workers}
        self._telemetry: dict[str, dict[str, Any]] = {}
        self._healthy = dict.fromkeys(deployment.workers, True)
        self._queue: deque[_Waiter] = deque()
        self._streams: dict[str, RayStream] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self.ttft_s: list[float] = []  # per finished request (the demo's percentiles)
        self.tpot_s: list[float] = []

    # ---- ServingBackend ---------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    @property
    def max_model_len(self) -> int:
        return min(self.config.model.max_model_len, self.deployment.max_model_len)

    async def encode(self, text: str) -> list[int]:
        self._ensure_poller()
        h = self._any_healthy()
        return list(await h.actor.encode.remote(text))

    async def health(self) -> dict[str, Any]:
        self._ensure_poller()
        pools: dict[str, int] = {}
        for h in self.deployment.workers.values():
            pools[h.pool.name] = pools.get(h.pool.name, 0) + int(self._healthy.get(h.worker_id, False))
        return {"ok": bool(pools) and all(pools.values()) and not self._closing,
                "healthy_workers_by_pool": pools, "in_flight": len(self._streams), "queued": len(self._queue)}

    async def submit(self, request: GenerationRequest) -> RayStream:
        self._ensure_poller()
        if self._closing:
            raise BackendUnavailable("the server is shutting down")
        vocab = self.deployment.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                                      param="prompt", code="invalid_token_id")
        req = RouteRequest(request.request_id, len(request.prompt_token_ids), request.sampling.max_tokens,
                           request.sla_class, self.clock())
        t0 = time.monotonic()
        decision = self.admission.decide(req, self.snapshot(), self._queue_view())
        self._count_admission(decision)
        if decision.action is AdmissionAction.REJECT:
            self._reject(decision)
        if decision.action is AdmissionAction.ADMIT:
            route = self.router.route(req, self.snapshot())
            self._count_route(route)
            if route.placed:
                return await self._dispatch(request, route, t0)
            decision = self._not_placed(req, route)
        waiter = _Waiter(req, request, decision.sla_class or self.config.sla.default,
                         asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._gauge_queue()
        try:
            route = await asyncio.wait_for(asyncio.shield(waiter.future), QUEUE_TIMEOUT_S)
        except (asyncio.CancelledError, TimeoutError) as e:
            if waiter in self._queue:
                self._queue.remove(waiter)
                self._gauge_queue()
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release_ledger(request.request_id)  # placed just as we gave up: hand it back
                self._pump()
            waiter.future.cancel()
            if isinstance(e, TimeoutError):
                self.metrics.requests_rejected.labels(self.model_name, "queue_timeout").inc()
                raise Overloaded(f"queued {QUEUE_TIMEOUT_S:.0f} s without capacity", 1.0, "queue_timeout") from None
            raise
        return await self._dispatch(request, route, t0)

    # ---- decisions --------------------------------------------------------------------------------
    def _reject(self, d: AdmissionDecision) -> None:
        status = d.http_status
        if status == 429:
            self.metrics.requests_rejected.labels(self.model_name, d.reason.value).inc()
            raise Overloaded(f"{d.reason.value}: {d.detail}", d.retry_after_s or 1.0, d.reason.value)
        if status == 400:
            param = "sla_class" if d.reason is AdmissionReason.UNKNOWN_SLA_CLASS else "max_tokens"
            raise InvalidRequestError(d.detail, param=param, code=d.reason.value)
        raise BackendUnavailable(d.detail)

    def _not_placed(self, req: RouteRequest, route: RouteDecision) -> AdmissionDecision:
        """Admission said yes but the router could not place it now: queue under core's caps, or refuse."""
        if route.no_fit is not None and route.no_fit.value == "reject":
            if route.reason.value == "no_decode_worker":
                raise BackendUnavailable(route.arithmetic)
            self.metrics.requests_rejected.labels(self.model_name, route.reason.value).inc()
            raise Overloaded(f"{route.reason.value}: {route.arithmetic}", route.retry_after_s or 1.0,
                             route.reason.value)
        d = self.admission.queue_for_power(req, self._queue_view(), route.arithmetic)
        self._count_admission(d)
        if d.action is AdmissionAction.REJECT:
            self._reject(d)
        return d

    def _count_admission(self, d: AdmissionDecision) -> None:
        self.counters.record_admission(d)
        self.metrics.admission_decisions.labels(self.model_name, d.action.value, d.reason.value).inc()

    def _count_route(self, d: RouteDecision) -> None:
        self.counters.record_route(d)
        if self.route_log is not None:
            self.route_log.append(d)
        self.metrics.route_decisions.labels(self.model_name, d.reason.value).inc()
        log.debug("route %s: %s (%s)", d.request_id, d.reason.value, d.arithmetic)

    def _queue_view(self) -> QueueView:
        counts: dict[str, int] = {}
        for w in self._queue:
            counts[w.sla_class] = counts.get(w.sla_class, 0) + 1
        return QueueView(counts)

    def _pump(self) -> None:
        """Place queued requests, FIFO, while the router can (called whenever capacity frees)."""
        while self._queue:
            w = self._queue[0]
            if w.future.done():
                self._queue.popleft()
                continue
            route = self.router.route(w.req, self.snapshot())
            if not route.placed:
                break
            self._count_route(route)
            self._queue.popleft()
            self._reserve_ledger(w.gen, route)  # hold the capacity before the waiter's task resumes
            w.future.set_result(route)
        self._gauge_queue()

    def _gauge_queue(self) -> None:
        self.metrics.requests_waiting.labels("frontend", "dispatcher", "none", "queue").set(len(self._queue))

    # ---- the ledger and the snapshot --------------------------------------------------------------
    def _reserve_ledger(self, gen: GenerationRequest, route: RouteDecision) -> None:
        rid = gen.request_id
        dh = self.deployment.workers[route.decode_worker_id or ""]
        kv_tokens = len(gen.prompt_token_ids) + gen.sampling.max_tokens
        self._ledger[dh.worker_id].blocks[rid] = blocks_for(min(kv_tokens, self.max_model_len),
                                                            int(dh.info["block_size"]))
        self._ledger[dh.worker_id].not_decoding.add(rid)
        prefill_id = route.prefill_worker_id if route.prefill_worker_id is not None else dh.worker_id
        self._ledger[prefill_id].prefill_tokens[rid] = len(gen.prompt_token_ids)

    def _release_ledger(self, rid: str, prefill_only: bool = False) -> None:
        for led in self._ledger.values():
            led.prefill_tokens.pop(rid, None)
            if not prefill_only:
                led.blocks.pop(rid, None)
                led.not_decoding.discard(rid)

    def _decoding(self, rid: str) -> None:
        """The decode worker says `rid` is decoding: its prefill is over, it counts in the running batch."""
        for led in self._ledger.values():
            led.prefill_tokens.pop(rid, None)
            led.not_decoding.discard(rid)

    def snapshot(self) -> ClusterSnapshot:
        """The router's view now (see the module docstring for where each number comes from)."""
        ws = []
        for wid, h in self.deployment.workers.items():
            led = self._ledger[wid]
            tel = self._telemetry.get(wid, {})
            total = int(h.info["num_total_blocks"]) if h.role is not Role.PREFILL else 0
            ws.append(WorkerSnapshot(
                worker_id=wid, pool=h.pool.name, role=h.role, hardware=h.pool.hardware,
                healthy=self._healthy.get(wid, False),
                queued_prefill_tokens=sum(led.prefill_tokens.values()),
                running_batch=len(led.blocks) - len(led.not_decoding), waiting=len(led.not_decoding),
                free_kv_blocks=max(0, total - sum(led.blocks.values())), total_kv_blocks=total,
                block_size=int(h.info["block_size"]), power_w=tel.get("power_w"),
            ))
        return ClusterSnapshot(tuple(ws), time_s=self.clock())

    # ---- dispatch ---------------------------------------------------------------------------------
    async def _dispatch(self, gen: GenerationRequest, route: RouteDecision, t0: float) -> RayStream:
        rid = gen.request_id
        if rid not in self._ledger[route.decode_worker_id or ""].blocks:
            self._reserve_ledger(gen, route)
        decode = self.deployment.workers[route.decode_worker_id or ""]
        prefill = self.deployment.workers[route.prefill_worker_id] if route.prefill_worker_id else None
        stream = RayStream(self, gen, decode, prefill, t0)
        self._streams[rid] = stream
        try:
            if prefill is None:
                await decode.actor.submit_local.remote(rid, gen.prompt_token_ids, gen.sampling)
            else:
                await decode.actor.reserve.remote(rid, decode.info["kv_layout"], len(gen.prompt_token_ids),
                                                  gen.sampling, self.config.kv_transport.lease_s)
                stream.prefill_task = asyncio.ensure_future(self._prefill(stream, prefill, decode))
        except BaseException as e:
            await stream.cancel()
            cause = getattr(e, "cause", None)
            if isinstance(cause, TandemError) and isinstance(cause, ValueError):  # the engine refused the input
                raise InvalidRequestError(f"{type(cause).__name__}: {cause}", param="prompt") from None
            if isinstance(e, TandemError | asyncio.CancelledError):
                raise
            raise RequestFailed(f"dispatch of {rid} to {decode.worker_id} failed: {_err(e)}") from None
        return stream

    async def _prefill(self, stream: RayStream, prefill: WorkerHandle, decode: WorkerHandle) -> dict[str, Any]:
        gen = stream.gen
        ack = await prefill.actor.prefill_to.remote(gen.request_id, gen.prompt_token_ids, gen.sampling,
                                                    decode.info["kv_address"])
        self._release_ledger(gen.request_id, prefill_only=True)
        labels = (prefill.pool.name, decode.pool.name, self.config.kv_transport.kind.value)
        self.metrics.kv_transfer_bytes.labels(*labels).inc(ack["bytes"])
        self.metrics.kv_transfer_s.labels(*labels).observe(ack["receive_ms"] / 1e3)
        return ack

    def _finished(self, rid: str) -> None:
        self._streams.pop(rid, None)
        self._release_ledger(rid)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        """Pump the queue once, after every completion already due in this event-loop pass."""
        if self._pump_soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pump()
            return
        self._pump_soon = True

        def run() -> None:
            self._pump_soon = False
            self._pump()

        loop.call_soon(run)

    # ---- telemetry --------------------------------------------------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while not self._closing:
            await self.poll_once()
            await asyncio.sleep(TELEMETRY_PERIOD_S)

    async def poll_once(self, timeout_s: float = 5.0) -> None:
        """Ask every worker for telemetry; a worker that does not answer is marked unhealthy."""
        handles = list(self.deployment.workers.values())

        async def one(h: WorkerHandle) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(h.actor.telemetry.remote(), timeout_s)
            except Exception as e:
                log.warning("telemetry from %s failed: %s", h.worker_id, _err(e))
                return None

        results = await asyncio.gather(*(one(h) for h in handles))
        snap_before = self.snapshot()
        for h, tel in zip(handles, results, strict=True):
            wid = h.worker_id
            was = self._healthy.get(wid, True)
            self._healthy[wid] = bool(tel and tel.get("healthy"))
            if was != self._healthy[wid]:
                self._pump()
            if tel is None:
                continue
            self._telemetry[wid] = tel
            labels = (h.pool.name, h.role.value, h.pool.placement.accelerator_type or "cpu", wid)
            m = self.metrics
            m.worker_up.labels(*labels).set(1 if self._healthy[wid] else 0)
            m.requests_running.labels(*labels).set(tel.get("running", 0))
            m.requests_waiting.labels(*labels).set(tel.get("waiting", 0))
            total = tel.get("total_kv_blocks", 0)
            if total:
                m.kv_usage.labels(*labels).set(1.0 - tel.get("free_kv_blocks", 0) / total)
                m.kv_free_blocks.labels(*labels).set(tel.get("free_kv_blocks", 0))
            live = tel.get("power_w")
            watts = live if live is not None else self.router.power.worker_w(snap_before.worker(wid))
            m.power_w.labels(*labels, "meter" if live is not None else "model").set(watts)
        self.metrics.frontend_inflight.labels(self.model_name).set(len(self._streams))

    def _any_healthy(self) -> WorkerHandle:
        for h in self.deployment.decode_capable() + list(self.deployment.workers.values()):
            if self._healthy.get(h.worker_id, False):
                return h
        raise BackendUnavailable("no healthy worker")

    # ---- shutdown ---------------------------------------------------------------------------------
    async def drain_and_close(self, timeout_s: float = 30.0) -> int:
        """Refuse new requests, wait for in-flight ones (up to timeout_s), cancel the rest.

        Returns how many had to be cancelled."""
        self._closing = True
        for w in list(self._queue):
            if not w.future.done():
                w.future.set_exception(BackendUnavailable("the server is shutting down"))
        self._queue.clear()
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._streams.values())
        for s in left:
            await s.cancel()
        if self._poller is not None:
            self._poller.cancel()
        return len(left)

"""Admission: is a request let in now, parked in its class queue, or turned away (and why)?

    Admission(config, router).decide(req, snapshot, queues) -> AdmissionDecision

In order, first match wins:
1. unknown SLA class                                       → REJECT UNKNOWN_SLA_CLASS   (HTTP 400)
2. prompt + max_tokens > model.max_model_len               → REJECT CONTEXT_TOO_LONG    (HTTP 400)
3. no healthy decode-capable worker                        → REJECT NO_HEALTHY_WORKER   (HTTP 503)
   prompt + max_tokens > the largest decode worker's whole KV cache → REJECT EXCEEDS_KV_CAPACITY (400)
4. best predicted TTFT (router.best_ttft_ms) > class ttft_ms
   (when admission.reject_unreachable_sla)                 → REJECT SLA_UNREACHABLE     (HTTP 429)
5. requests of its class already waiting, or no decode worker has KV room now:
     class queue < its cap and all queues < max_waiting    → QUEUE (QUEUED_BEHIND | NO_KV_CAPACITY)
     else                                                  → REJECT QUEUE_FULL          (HTTP 429)
6. otherwise                                               → ADMIT

`queue_for_power(req, queues)` answers the same cap question for a request the router could not
place within the power budget (and `power.queue_cap` bounds all waiting requests in that case). Every 429 carries Retry-After: the predicted wait rounded up to whole
seconds, at least `admission.min_retry_after_s`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.config.models import SLAClass, TandemConfig
from orchestrator.core.router import RouteEval, Router
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest
from orchestrator.core.types import mypyc_attr


class AdmissionAction(enum.StrEnum):
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


class AdmissionReason(enum.StrEnum):
    ADMITTED = "admitted"
    QUEUED_BEHIND = "queued_behind"  # others of its class are waiting: FIFO
    NO_KV_CAPACITY = "no_kv_capacity"  # no decode worker has room for it yet
    POWER_QUEUED = "power_queued"  # the router found no placement within the power budget
    UNKNOWN_SLA_CLASS = "unknown_sla_class"
    CONTEXT_TOO_LONG = "context_too_long"
    EXCEEDS_KV_CAPACITY = "exceeds_kv_capacity"  # no decode worker's whole cache could hold it
    NO_HEALTHY_WORKER = "no_healthy_worker"
    SLA_UNREACHABLE = "sla_unreachable"
    QUEUE_FULL = "queue_full"
    OVER_POWER_BUDGET = "over_power_budget"

    @property
    def http_status(self) -> int:
        """The status the API answers a rejection with (200 for the non-rejecting reasons)."""
        return _HTTP.get(self, 200)


_HTTP = {
    AdmissionReason.UNKNOWN_SLA_CLASS: 400,
    AdmissionReason.CONTEXT_TOO_LONG: 400,
    AdmissionReason.EXCEEDS_KV_CAPACITY: 400,
    AdmissionReason.NO_HEALTHY_WORKER: 503,
    AdmissionReason.SLA_UNREACHABLE: 429,
    AdmissionReason.QUEUE_FULL: 429,
    AdmissionReason.OVER_POWER_BUDGET: 429,
}


@dataclass(frozen=True)
class QueueView:
    """How many requests wait in each SLA class queue right now (missing class = 0)."""

    waiting_by_class: Mapping[str, int] = field(default_factory=dict)

    def waiting(self, sla_class: str) -> int:
        return self.waiting_by_class.get(sla_class, 0)

    @property
    def total(self) -> int:
        return sum(self.waiting_by_class.values())


@mypyc_attr(native_class=False)
@dataclass(frozen=True, init=False)
class AdmissionDecision:
    """Admit, queue or reject, why, and when to retry. `__init__` is written out (the fields'
    parameters; the instance dict written directly, as `RouteDecision` does)."""

    request_id: str
    action: AdmissionAction
    reason: AdmissionReason
    sla_class: str | None  # the resolved class (None when it was unknown)
    detail: str
    retry_after_s: float | None = None  # set on every REJECT

    def __init__(self, request_id: str, action: AdmissionAction, reason: AdmissionReason, sla_class: str | None,
                 detail: str, retry_after_s: float | None = None) -> None:
        d = self.__dict__
        d["request_id"] = request_id
        d["action"] = action
        d["reason"] = reason
        d["sla_class"] = sla_class
        d["detail"] = detail
        d["retry_after_s"] = retry_after_s

    @classmethod
    def _formatted_later(cls, request_id: str, action: AdmissionAction, reason: AdmissionReason,
                         sla_class: str | None, template: str, *args: float) -> AdmissionDecision:
        """A decision whose `detail` is `template.format(*args)`, formatted on first read (admission
        admits millions of simulated requests whose detail nobody reads). Reads, equality, hashing,
        repr and `dataclasses.asdict` all see the formatted text."""
        self = cls.__new__(cls)
        d = self.__dict__
        d["request_id"] = request_id
        d["action"] = action
        d["reason"] = reason
        d["sla_class"] = sla_class
        d["_detail_args"] = (template, args)
        d["retry_after_s"] = None
        return self

    def __getattr__(self, name: str) -> str:  # only called when `detail` is not formatted yet
        lazy = self.__dict__.get("_detail_args") if name == "detail" else None
        if lazy is not None:
            text = self.__dict__["detail"] = lazy[0].format(*lazy[1])
            self.__dict__.pop("_detail_args", None)
            return text
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def http_status(self) -> int:
        return self.reason.http_status


class Admission:
    """SLA classes and bounded queues in front of the router."""

    def __init__(self, config: TandemConfig, router: Router) -> None:
        self.config = config
        self.router = router
        # the router evaluation the last `decide` made (None when it stopped before the TTFT check):
        # `router.route(req, snap, admission.last_evaluation)` reuses it when nothing changed since
        self.last_evaluation: RouteEval | None = None
        # the (frozen) config's classes by name — the first of a name, as `config.sla_class` finds it
        self._classes: dict[str, SLAClass] = {}
        for c in config.sla.classes:
            self._classes.setdefault(c.name, c)
        self._default_class = config.sla.default
        self._max_model_len = config.model.max_model_len  # (read per request from the frozen config)
        self._reject_unreachable = config.admission.reject_unreachable_sla

    def _retry(self, wait_ms: float | None = None) -> float:
        floor = self.config.admission.min_retry_after_s
        if wait_ms is None or not math.isfinite(wait_ms):
            return floor
        return max(floor, float(math.ceil(wait_ms / 1e3)))

    def decide(self, req: RouteRequest, snap: ClusterSnapshot, queues: QueueView) -> AdmissionDecision:
        """Admit, queue or reject `req` (see the module docstring for the rules, in order)."""
        cfg = self.config
        rid = req.request_id
        self.last_evaluation = None
        name = req.sla_class
        sla = self._classes.get(self._default_class if name is None else name)  # cfg.sla_class(name)
        if sla is None:
            names = ", ".join(c.name for c in cfg.sla.classes)
            return AdmissionDecision(
                rid, AdmissionAction.REJECT, AdmissionReason.UNKNOWN_SLA_CLASS, None,
                f"unknown SLA class {req.sla_class!r}; classes: {names}", self._retry(),
            )
        limit = self._max_model_len  # cfg.model.max_model_len
        kv_tokens = req.prompt_tokens + req.max_tokens  # req.kv_tokens
        if kv_tokens > limit:
            return AdmissionDecision(
                rid, AdmissionAction.REJECT, AdmissionReason.CONTEXT_TOO_LONG, sla.name,
                f"prompt {req.prompt_tokens} + max_tokens {req.max_tokens} = {req.kv_tokens} tokens "
                f"exceeds the context length {limit}", self._retry(),
            )
        if not snap.decode_view():
            return AdmissionDecision(
                rid, AdmissionAction.REJECT, AdmissionReason.NO_HEALTHY_WORKER, sla.name,
                "no healthy decode-capable worker", self._retry(),
            )
        biggest = snap.max_decode_kv_tokens()
        if kv_tokens > biggest:
            return AdmissionDecision(
                rid, AdmissionAction.REJECT, AdmissionReason.EXCEEDS_KV_CAPACITY, sla.name,
                f"prompt {req.prompt_tokens} + max_tokens {req.max_tokens} = {req.kv_tokens} tokens exceeds "
                f"the largest decode worker's KV cache ({biggest} tokens)", self._retry(),
            )
        ev = self.last_evaluation = self.router.evaluate(req, snap)
        best = self.router.best_ttft_ms(req, snap, ev)
        if self._reject_unreachable and best is not None and best > sla.ttft_ms:  # cfg.admission.reject_unreachable_sla
            return AdmissionDecision(
                rid, AdmissionAction.REJECT, AdmissionReason.SLA_UNREACHABLE, sla.name,
                f"best predicted TTFT {best:.0f}ms > class {sla.name} target {sla.ttft_ms:.0f}ms",
                self._retry(best - sla.ttft_ms),
            )
        behind = queues.waiting(sla.name)
        if behind > 0 or best is None:
            reason = AdmissionReason.QUEUED_BEHIND if behind > 0 else AdmissionReason.NO_KV_CAPACITY
            why = f"{behind} of class {sla.name} waiting" if behind > 0 else "no decode worker has KV room yet"
            return self._queue_or_reject(req, sla.name, queues, reason, why, best)
        return AdmissionDecision._formatted_later(
            rid, AdmissionAction.ADMIT, AdmissionReason.ADMITTED, sla.name,
            "best predicted TTFT {:.0f}ms <= {:.0f}ms", best, sla.ttft_ms,
        )

    def queue_for_power(self, req: RouteRequest, queues: QueueView, why: str = "") -> AdmissionDecision:
        """For a request the router found no watts for: queue it if the caps allow, else 429."""
        sla = self.config.sla_class(req.sla_class) if self._known(req) else None
        name = sla.name if sla is not None else self.config.sla.default
        power_cap = self.config.power.queue_cap if self.config.power is not None else 0
        waiting_for_power = queues.total
        if waiting_for_power >= power_cap:
            return AdmissionDecision(
                req.request_id, AdmissionAction.REJECT, AdmissionReason.OVER_POWER_BUDGET, name,
                f"over the power budget and the power queue is full ({waiting_for_power}/{power_cap}); {why}",
                self._retry(),
            )
        return self._queue_or_reject(req, name, queues, AdmissionReason.POWER_QUEUED, why or "over power budget")

    def _known(self, req: RouteRequest) -> bool:
        try:
            self.config.sla_class(req.sla_class)
        except KeyError:
            return False
        return True

    def _queue_or_reject(
        self,
        req: RouteRequest,
        sla_name: str,
        queues: QueueView,
        reason: AdmissionReason,
        why: str,
        wait_ms: float | None = None,
    ) -> AdmissionDecision:
        adm = self.config.admission
        cap = adm.queue_cap(sla_name)
        mine = queues.waiting(sla_name)
        if mine < cap and queues.total < adm.max_waiting:
            return AdmissionDecision(
                req.request_id, AdmissionAction.QUEUE, reason, sla_name,
                f"{why}; queue {sla_name} {mine + 1}/{cap}, all {queues.total + 1}/{adm.max_waiting}",
            )
        return AdmissionDecision(
            req.request_id, AdmissionAction.REJECT, AdmissionReason.QUEUE_FULL, sla_name,
            f"{why}; queue {sla_name} {mine}/{cap}, all {queues.total}/{adm.max_waiting}: full",
            self._retry(wait_ms),
        )

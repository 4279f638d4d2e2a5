"""The router: where a request goes, and why, with the arithmetic.

`Router(config, cost_model).route(req, snapshot) -> RouteDecision`. The runtime calls it with a
snapshot built from live telemetry; the simulator with one built from its simulated fleet. Same
inputs, same decision: every scan runs over workers sorted by id, ties break on worker id, and no
randomness or wall time enters.

One route, in four steps:
1. decode candidates: healthy decode-capable workers with free KV blocks for prompt + max_tokens,
   least loaded first: sort key (running_batch + waiting, −free_kv_blocks, worker_id). None healthy →
   NO_DECODE_WORKER (reject); none with room → NO_KV_CAPACITY (queue: blocks come back; reject when
   no worker's whole cache could ever hold the request).
2. the policy named by `routing.kind` (registry below) ranks placements, each with a reason and its
   arithmetic (`policies.py`).
3. the power budget (`power.py`) takes the first ranked placement that fits; if that was not the
   policy's first choice the reason becomes POWER_CAPPED, naming what was over budget.
4. nothing fits → OVER_POWER_BUDGET with `power.on_no_fit` (queue or reject) and a retry-after.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.config.models import NoFitAction, RoutingKind, SLAClass, TandemConfig
from orchestrator.core.estimates import Estimator, Local, Placement, Scan
from orchestrator.core.fleet_index import FleetIndex
from orchestrator.core.ports import CostModelPort
from orchestrator.core.power import PowerAccountant
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, WorkerSnapshot
from orchestrator.core.types import TandemError, mypyc_attr


@mypyc_attr(native_class=False)
class UnknownSLAClass(TandemError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown SLA class"


@mypyc_attr(native_class=False)
class UnknownRoutingPolicy(TandemError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown routing policy"


class RouteReason(enum.StrEnum):
    """Why a request went where it went (counted in metrics; one label value each)."""

    LOCAL_FASTER = "local_faster"  # context-ttft: local predicted TTFT <= best remote (+ margin)
    REMOTE_FASTER = "remote_faster"  # context-ttft: a remote prefill is predicted faster
    COLOCATED = "colocated"  # no prefill pool in the cluster: prefill where decode runs
    BELOW_THRESHOLD = "below_threshold"  # threshold: prompt < threshold → local
    AT_OR_ABOVE_THRESHOLD = "at_or_above_threshold"  # threshold: prompt >= threshold → remote
    TIER_LOCAL = "tier_local"  # tiers: the prompt's tier prefills locally
    TIER_REMOTE = "tier_remote"  # tiers: the prompt's tier names a prefill pool
    NO_PREFILL_WORKER = "no_prefill_worker"  # remote wanted, no healthy prefill worker: local
    LEAST_ENERGY = "least_energy"  # power: fewest J/token among placements meeting the SLA
    SLA_MISS_FASTEST = "sla_miss_fastest"  # power: nothing meets the SLA; the fastest placement
    POWER_CAPPED = "power_capped"  # the policy's first choice was over budget; a later one fit
    OVER_POWER_BUDGET = "over_power_budget"  # no placement fits the budget (queue or reject)
    NO_KV_CAPACITY = "no_kv_capacity"  # no decode worker has free blocks now (queue) or ever (reject)
    NO_DECODE_WORKER = "no_decode_worker"  # no healthy decode-capable worker (reject)


Text = str | Callable[[], str]
"""Reason text, or a function that formats it: the router builds the arithmetic only when read."""


def text_of(t: Text) -> str:
    return t if isinstance(t, str) else t()


@mypyc_attr(native_class=False)
@dataclass(frozen=True, eq=False, init=False)
class RouteDecision:
    """Where a request goes (or why it cannot go now), with the numbers that decided it.

    `arithmetic` is formatted on first access from `arithmetic_text` (the simulator routes millions
    of requests and reads it for almost none); equality compares the formatted text. `__init__` is
    written out (the same parameters as the fields, writing the instance dict directly: a frozen
    dataclass's generated one costs three times as much); a test checks it against the fields."""

    request_id: str
    policy: RoutingKind
    reason: RouteReason
    arithmetic_text: Text = field(repr=False)
    decode_worker_id: str | None = None
    prefill_worker_id: str | None = None  # None with a decode worker: local prefill
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    predicted_energy_j: float | None = None
    predicted_power_w: float | None = None  # projected cluster power with this placement
    no_fit: NoFitAction | None = None  # set when not placed: queue (retry later) or reject
    retry_after_s: float | None = None

    def __init__(
        self, request_id: str, policy: RoutingKind, reason: RouteReason, arithmetic_text: Text,
        decode_worker_id: str | None = None, prefill_worker_id: str | None = None,
        predicted_ttft_ms: float | None = None, predicted_tpot_ms: float | None = None,
        predicted_energy_j: float | None = None, predicted_power_w: float | None = None,
        no_fit: NoFitAction | None = None, retry_after_s: float | None = None,
    ) -> None:
        d = self.__dict__
        d["request_id"] = request_id
        d["policy"] = policy
        d["reason"] = reason
        d["arithmetic_text"] = arithmetic_text
        d["decode_worker_id"] = decode_worker_id
        d["prefill_worker_id"] = prefill_worker_id
        d["predicted_ttft_ms"] = predicted_ttft_ms
        d["predicted_tpot_ms"] = predicted_tpot_ms
        d["predicted_energy_j"] = predicted_energy_j
        d["predicted_power_w"] = predicted_power_w
        d["no_fit"] = no_fit
        d["retry_after_s"] = retry_after_s

    @property
    def arithmetic(self) -> str:
        a = self.arithmetic_text
        if not isinstance(a, str):
            a = a()
            object.__setattr__(self, "arithmetic_text", a)
        return a

    def _astuple(self) -> tuple[Any, ...]:
        return (
            self.request_id, self.policy, self.reason, self.arithmetic, self.decode_worker_id,
            self.prefill_worker_id, self.predicted_ttft_ms, self.predicted_tpot_ms, self.predicted_energy_j,
            self.predicted_power_w, self.no_fit, self.retry_after_s,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteDecision):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        return (
            f"RouteDecision(request_id={self.request_id!r}, reason={self.reason.value}, "
            f"decode_worker_id={self.decode_worker_id!r}, prefill_worker_id={self.prefill_worker_id!r}, "
            f"arithmetic={self.arithmetic!r})"
        )

    @property
    def placed(self) -> bool:
        return self.decode_worker_id is not None

    @property
    def local_prefill(self) -> bool:
        return self.placed and self.prefill_worker_id is None

    def key(self) -> tuple[str, str | None, str | None, str]:
        """What the contract test compares between the simulator and the runtime."""
        return (self.request_id, self.decode_worker_id, self.prefill_worker_id, self.reason.value)


class Candidate:
    """A placement a policy proposes, with the reason and arithmetic it would be chosen for
    (`arithmetic_text` may be a function that formats it: only the chosen one is ever read)."""

    __slots__ = ("placement", "reason", "arithmetic_text")

    def __init__(self, placement: Placement, reason: RouteReason, arithmetic: Text) -> None:
        self.placement = placement
        self.reason = reason
        self.arithmetic_text = arithmetic

    @property
    def arithmetic(self) -> str:
        a = self.arithmetic_text
        if not isinstance(a, str):
            a = self.arithmetic_text = a()
        return a

    def __repr__(self) -> str:
        return f"Candidate({self.placement!r}, {self.reason.value}, {self.arithmetic!r})"


class RouteContext:
    """What a policy may use: the config, the estimator (cost model), the power accountant."""

    def __init__(self, config: TandemConfig, estimator: Estimator, power: PowerAccountant) -> None:
        self.config = config
        self.estimator = estimator
        self.power = power

    def sla(self, req: RouteRequest) -> SLAClass:
        try:
            return self.config.sla_class(req.sla_class)
        except KeyError:
            raise UnknownSLAClass(
                f"{req.request_id}: unknown SLA class {req.sla_class!r}; "
                f"classes: {', '.join(c.name for c in self.config.sla.classes)}"
            ) from None


class RoutingPolicy(Protocol):
    kind: RoutingKind

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Iterable[Candidate]:
        """Placements in order of preference, at least one (`decodes` is non-empty, least loaded first).

        May be a generator: the router stops at the first placement within the power budget, so
        fallbacks are only computed when needed. Only the first needs its `arithmetic`."""
        ...


_REGISTRY: dict[RoutingKind, Callable[[Any], RoutingPolicy]] = {}


def register_policy(kind: RoutingKind) -> Callable[[Callable[[Any], RoutingPolicy]], Callable[[Any], RoutingPolicy]]:
    """Class decorator: make a policy selectable by `routing.kind` in the config."""

    def deco(factory: Callable[[Any], RoutingPolicy]) -> Callable[[Any], RoutingPolicy]:
        _REGISTRY[kind] = factory
        return factory

    return deco


def make_policy(routing_cfg: Any) -> RoutingPolicy:
    from orchestrator.core import policies  # noqa: F401  (registers the built-in policies)

    kind = RoutingKind(routing_cfg.kind)
    try:
        factory = _REGISTRY[kind]
    except KeyError:
        raise UnknownRoutingPolicy(f"no routing policy registered for {kind.value!r}") from None
    return factory(routing_cfg)


def least_loaded_key(w: WorkerSnapshot) -> tuple[int, int, str]:
    """Decode worker order: fewest sequences (running + waiting), then most free blocks, then id."""
    return (w.running_batch + w.waiting, -w.free_kv_blocks, w.worker_id)


class DecodeOrder(Sequence[WorkerSnapshot]):
    """The decode candidates of one request, least loaded first (`least_loaded_key`), as a read-only
    sequence: the first is found in one pass over the workers; the whole order is sorted only when
    something reads past it (the built-in policies other than `power` never do)."""

    __slots__ = ("_request", "_healthy", "first", "_all")

    def __init__(self, request: RouteRequest, healthy: Sequence[WorkerSnapshot], first: Any = False) -> None:
        self._request = request
        self._healthy = healthy
        self._all: list[WorkerSnapshot] | None = None
        if first is not False:  # the first, found by the caller (FleetIndex.first_decode: the same worker)
            self.first = first
            return
        n = request.kv_tokens  # free_kv_blocks ≥ ⌈n / block_size⌉  ⇔  free_kv_blocks · block_size ≥ n
        best: WorkerSnapshot | None = None
        best_load = best_free = 0
        for w in healthy:  # sorted by id: on a full tie the earlier (lower id) one stays
            f = w.__dict__  # the dataclass's fields, read from its dict: half the cost of attribute reads
            free = f["free_kv_blocks"]
            if free * f["block_size"] >= n:
                load = f["running_batch"] + f["waiting"]
                if best is None or load < best_load or (load == best_load and free > best_free):
                    best, best_load, best_free = w, load, free
        self.first = best

    def _sorted(self) -> list[WorkerSnapshot]:
        if self._all is None:
            self._all = Router._fitting(self._request, self._healthy) if self.first is not None else []
        return self._all

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if i == 0 and self.first is not None and type(i) is int:
            return self.first
        return self._sorted()[i]

    def __len__(self) -> int:
        return len(self._sorted())

    def __bool__(self) -> bool:
        return self.first is not None

    def __iter__(self) -> Iterator[WorkerSnapshot]:
        return iter(self._sorted())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DecodeOrder | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"DecodeOrder({[w.worker_id for w in self]!r})"


class RouteEval:
    """What admission and the router both need for one request on one snapshot state: the healthy
    decode workers and those with KV room, least loaded first (`decodes`, a `DecodeOrder`), and —
    once `Router.best_ttft_ms` has scanned the prefill workers — `fastest`: (the prefill list scanned,
    `Estimator.remote_scan`'s scan, `Estimator.local_s` of the least-loaded decode worker). `Router.evaluate`
    builds it; `Admission.decide` keeps the one it used (`last_evaluation`) so that a caller routing the
    same request on the same, unchanged snapshot right after can hand it to `Router.route`."""

    __slots__ = ("request", "snapshot", "healthy", "decodes", "fastest")

    def __init__(
        self, request: RouteRequest, snapshot: ClusterSnapshot,
        healthy: Sequence[WorkerSnapshot], decodes: Sequence[WorkerSnapshot],
    ) -> None:
        self.request = request
        self.snapshot = snapshot
        self.healthy = healthy
        self.decodes = decodes
        self.fastest: tuple[Sequence[WorkerSnapshot], Scan, Local] | None = None


class Router:
    """Routes requests by the config's policy, the cost model and the power budget."""

    def __init__(
        self, config: TandemConfig, cost_model: CostModelPort, *, power: PowerAccountant | None = None
    ) -> None:
        self.config = config
        self.policy = make_policy(config.routing)
        self.power = power or PowerAccountant(cost_model, config.power)
        self.estimator = Estimator(config, cost_model, self.power)
        self.ctx = RouteContext(config, self.estimator, self.power)
        self.index = FleetIndex(self.estimator, self.power)  # views of a snapshot with a change log
        # optional on a policy (see route): (request, RouteEval.fastest) -> its first Candidate
        self._first_from_scan = getattr(self.policy, "first_from_scan", None)

    @property
    def kind(self) -> RoutingKind:
        return self.policy.kind

    def decode_candidates(self, req: RouteRequest, snap: ClusterSnapshot) -> list[WorkerSnapshot]:
        """Healthy decode-capable workers with KV room for the request, least loaded first."""
        return self._fitting(req, snap.decode_workers())

    @staticmethod
    def _fitting(req: RouteRequest, healthy: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        n = req.kv_tokens  # free_kv_blocks ≥ ⌈n / block_size⌉  ⇔  free_kv_blocks · block_size ≥ n
        # sorted by least_loaded_key, decorated inline (worker ids are unique: w is never compared)
        dec = [
            (w.running_batch + w.waiting, -w.free_kv_blocks, w.worker_id, w)
            for w in healthy if w.free_kv_blocks * w.block_size >= n
        ]
        dec.sort()
        return [t[3] for t in dec]

    def evaluate(self, req: RouteRequest, snap: ClusterSnapshot) -> RouteEval:
        """The decode candidates of `req` on `snap` as it is now (see RouteEval)."""
        healthy = snap.decode_view()
        idx = self.index
        if idx.sync(snap):
            first = idx.first_decode(req.prompt_tokens + req.max_tokens)  # (req.kv_tokens, without the property)
            return RouteEval(req, snap, healthy, DecodeOrder(req, healthy, first))
        return RouteEval(req, snap, healthy, DecodeOrder(req, healthy))

    def route(self, req: RouteRequest, snap: ClusterSnapshot, evaluation: RouteEval | None = None) -> RouteDecision:
        """Decide where `req` goes: a function of (req, snap) only — it changes nothing but its own memos
        (and `self.index`, a cache of `snap`). `evaluation`: `self.evaluate(req, snap)` computed on this
        very snapshot state (e.g. by admission just before); ignored when made for another request or snapshot."""
        if evaluation is None or evaluation.request is not req or evaluation.snapshot is not snap:
            evaluation = self.evaluate(req, snap)
            hint = None
        else:  # made on this very snapshot state: the prefill scan of best_ttft_ms still holds
            hint = evaluation.fastest
        if hint is None:
            return self._route(req, snap, evaluation)
        if self._first_from_scan is not None and self.config.power is None and self.power.budget is None:
            return self._unbudgeted(req, snap, self._first_from_scan(req, hint))
        est = self.estimator
        est.hint = (req, *hint)
        try:
            return self._route(req, snap, evaluation)
        finally:
            est.hint = None

    def _route(self, req: RouteRequest, snap: ClusterSnapshot, evaluation: RouteEval) -> RouteDecision:
        kind = self.policy.kind
        healthy = evaluation.healthy
        if not healthy:
            return RouteDecision(
                req.request_id, kind, RouteReason.NO_DECODE_WORKER,
                "no healthy decode-capable worker", no_fit=NoFitAction.REJECT,
                retry_after_s=self.config.admission.min_retry_after_s,
            )
        decodes = evaluation.decodes
        if not decodes:
            most = max(healthy, key=lambda w: (w.free_kv_blocks, w.worker_id))
            need = math.ceil(req.kv_tokens / most.block_size)
            ever = any(w.total_kv_blocks * w.block_size >= req.kv_tokens for w in healthy)
            return RouteDecision(
                req.request_id, kind, RouteReason.NO_KV_CAPACITY,
                f"needs {need} KV blocks ({req.kv_tokens} tokens); most free: {most.free_kv_blocks} on "
                f"{most.worker_id}" + ("" if ever else "; no decode worker has that many blocks at all"),
                no_fit=NoFitAction.QUEUE if ever else NoFitAction.REJECT,
                retry_after_s=self.config.admission.min_retry_after_s,
            )
        if self.config.power is None and self.power.budget is None:
            # no budget: the policy's first choice always fits; only the projected draw is reported
            first_of = getattr(self.policy, "first_candidate", None)  # optional: the first without a generator
            if first_of is not None:
                c = first_of(req, snap, decodes, self.ctx)
            else:
                c = next(iter(self.policy.candidates(req, snap, decodes, self.ctx)))
            return self._unbudgeted(req, snap, c)
        first: Candidate | None = None
        first_why = ""
        tried = 0
        totals = self.power.totals(snap)
        for c in self.policy.candidates(req, snap, decodes, self.ctx):
            tried += 1
            if first is None:
                first = c
            pl = c.placement
            prefill = None if pl.prefill_worker_id is None else snap.worker(pl.prefill_worker_id)
            proj = self.power.project(snap, prefill, snap.worker(pl.decode_worker_id), totals)
            if not proj.fits:
                if c is first:
                    first_why = proj.why
                continue
            reason, arith = c.reason, c.arithmetic_text
            if c is not first:
                reason = RouteReason.POWER_CAPPED

                def capped(first: Candidate = first, why: str = first_why, pl: Placement = pl,
                           after_w: float = proj.after_w) -> str:
                    return f"{first.arithmetic}; over budget ({why}); took {pl.describe()} at {after_w:.0f} W"

                arith = capped
            elif self.config.power is not None:
                cap_w = self.config.power.cluster_w

                def with_power(base: Text = arith, after_w: float = proj.after_w, cap_w: float = cap_w) -> str:
                    return f"{text_of(base)}; power {after_w:.0f}/{cap_w:.0f} W"

                arith = with_power
            return RouteDecision(
                req.request_id, kind, reason, arith, pl.decode_worker_id, pl.prefill_worker_id,
                pl.ttft_ms, pl.tpot_ms, pl.energy_j, proj.after_w,
            )
        assert self.config.power is not None, "only a budget can refuse every placement"
        return RouteDecision(
            req.request_id, kind, RouteReason.OVER_POWER_BUDGET,
            f"{tried} placement(s), none fits: {first_why}; headroom "
            f"{self.power.headroom_w(snap):.0f} W",
            no_fit=self.config.power.on_no_fit, retry_after_s=self.retry_after_s(snap),
        )

    def _unbudgeted(self, req: RouteRequest, snap: ClusterSnapshot, c: Candidate) -> RouteDecision:
        """The decision for the policy's first candidate `c` without a power budget (it always fits; only
        the projected draw is reported). `route` comes here straight when its evaluation holds a hint:
        best_ttft_ms found a decode worker, so `_route`'s checks before this path pass."""
        pl = c.placement
        idx = self.index
        if idx.sync(snap):
            after_w = idx.after_w(idx.total_w(), pl.prefill_worker_id, pl.decode_worker_id)
        else:
            prefill = None if pl.prefill_worker_id is None else snap.worker(pl.prefill_worker_id)
            after_w = self.power.after_w(
                self.power.cluster_total_w(snap), prefill, snap.worker(pl.decode_worker_id))
        return RouteDecision(
            req.request_id, self.policy.kind, c.reason, c.arithmetic_text, pl.decode_worker_id,
            pl.prefill_worker_id, pl.ttft_ms, pl.tpot_ms, pl.energy_j, after_w,
        )

    def best_ttft_ms(
        self, req: RouteRequest, snap: ClusterSnapshot, evaluation: RouteEval | None = None
    ) -> float | None:
        """The lowest predicted TTFT over the least-loaded decode worker and every prefill worker
        (None when no decode worker could take the request). Admission uses it for the SLA check."""
        if evaluation is None or evaluation.request is not req or evaluation.snapshot is not snap:
            evaluation = self.evaluate(req, snap)
        decodes = evaluation.decodes
        if not decodes:
            return None
        est, prefills, d = self.estimator, snap.prefill_view(), decodes[0]
        if (idx := self.index).sync(snap):  # (q + pf) · 1e3: est.ttft_ms(req, d, False)
            q, pf = idx.local_s(d, req.prompt_tokens)
            best, scan = idx.remote_scan(req.prompt_tokens, (q + pf) * 1e3)
        else:
            q, pf = est.local_s(d, req.prompt_tokens)
            best, scan = est.remote_scan(req, prefills, (q + pf) * 1e3)
        evaluation.fastest = (prefills, scan, (d, q, pf))
        return best

    def retry_after_s(self, snap: ClusterSnapshot) -> float:
        """When watts should free up: the shortest queued prefill work among busy workers."""
        floor = self.config.admission.min_retry_after_s
        busy = [self.estimator.prefill_s(w, w.queued_prefill_tokens) for w in snap.workers if w.prefill_busy]
        return max(floor, float(math.ceil(min(busy)))) if busy else floor


__all__ = [
    "Candidate", "DecodeOrder", "RouteContext", "RouteDecision", "RouteEval", "RouteReason", "Text", "Router",
    "RoutingPolicy", "UnknownRoutingPolicy", "UnknownSLAClass", "least_loaded_key", "make_policy",
    "register_policy", "text_of",
]

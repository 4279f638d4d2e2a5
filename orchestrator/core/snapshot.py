"""The router's read-only view of the cluster, and the request facts it routes on.

The runtime builds a `ClusterSnapshot` from worker telemetry; the simulator builds one from its
simulated fleet. Both hand it to the same `Router`. Snapshots are frozen; workers are kept sorted
by `worker_id` so that every scan over them is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.core.types import Role, TandemError, mypyc_attr


@mypyc_attr(native_class=False)
class InvalidRequest(TandemError, ValueError):
    """A RouteRequest with impossible numbers (negative tokens, …)."""


@mypyc_attr(native_class=False)  # (its instance dict is read and written directly)
@dataclass(frozen=True, init=False)
class RouteRequest:
    """What the router and admission know of a request. `__init__` is written out (the fields'
    parameters, the instance dict written directly: cheaper than a frozen dataclass's) and checks
    the token counts (InvalidRequest)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    sla_class: str | None = None  # None = the config's default class
    arrival_s: float = 0.0

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int, sla_class: str | None = None,
                 arrival_s: float = 0.0) -> None:
        d = self.__dict__
        d["request_id"] = request_id
        d["prompt_tokens"] = prompt_tokens
        d["max_tokens"] = max_tokens
        d["sla_class"] = sla_class
        d["arrival_s"] = arrival_s
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 1:
            raise InvalidRequest(f"{self.request_id}: prompt_tokens must be an integer >= 1, got {self.prompt_tokens!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"{self.request_id}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV the decode worker must hold by the end: prompt + every generated token."""
        return self.prompt_tokens + self.max_tokens


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks needed to hold num_tokens tokens at block_size tokens per block."""
    return math.ceil(num_tokens / block_size)


@mypyc_attr(native_class=False)  # (its instance dict is read and written directly)
@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker as the router sees it at one instant."""

    worker_id: str
    pool: str
    role: Role
    hardware: str  # key into the hardware catalog
    healthy: bool = True
    queued_prefill_tokens: int = 0  # prompt tokens waiting for or in prefill on this worker
    running_batch: int = 0  # sequences in the decode batch
    waiting: int = 0  # requests queued on this worker (e.g. for KV blocks)
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    block_size: int = 16
    power_w: float | None = None  # live reading; None = model it

    @property
    def can_prefill(self) -> bool:
        return self.healthy and self.role in (Role.PREFILL, Role.BOTH, Role.DECODE)

    @property
    def can_decode(self) -> bool:
        return self.healthy and self.role in (Role.DECODE, Role.BOTH)

    @property
    def is_prefill_pool(self) -> bool:
        return self.role is Role.PREFILL

    @property
    def prefill_busy(self) -> bool:
        return self.queued_prefill_tokens > 0

    @property
    def decode_busy(self) -> bool:
        return self.running_batch > 0

    def fits(self, req: RouteRequest) -> bool:
        """Enough free KV blocks to hold the request to its last token."""
        return self.free_kv_blocks * self.block_size >= req.kv_tokens  # ⇔ free ≥ ⌈tokens / block_size⌉


class SnapshotChanges:
    """Which workers of a `ClusterSnapshot` its owner changed in place, and in what order: an
    append-only log of indices into `ClusterSnapshot.workers`, read by absolute position.

    Contract: an owner that updates a snapshot's `WorkerSnapshot`s in place (the simulator's bridge)
    calls `record(i)` for every worker whose fields it changed, before the core reads the snapshot
    again. A reader remembers the `position` it has seen; `since(pos)` is then the indices changed
    after it (repeats possible), or None when the log no longer reaches back that far (it keeps the
    last `keep` to 2·`keep` entries) — None means "anything may have changed": rebuild from the snapshot. A
    snapshot without a log (`changes=None`, what the runtime builds) means the same. Only the
    load fields may change in place (queued_prefill_tokens, running_batch, waiting, free_kv_blocks,
    power_w); never the worker set, ids, roles, pools, hardware, health or KV geometry."""

    __slots__ = ("log", "start", "keep")

    def __init__(self, keep: int = 4096) -> None:
        self.log: list[int] = []
        self.start = 0  # absolute position of log[0]
        self.keep = keep

    def record(self, index: int) -> None:
        """Worker `index` of the snapshot changed. (At 2·keep entries the oldest `keep` are dropped: a
        reader at most `keep` entries behind never has to rebuild; amortised O(1).)"""
        log = self.log
        if len(log) >= 2 * self.keep:
            del log[:self.keep]
            self.start += self.keep
        log.append(index)

    @property
    def position(self) -> int:
        """The absolute position after the last change recorded."""
        return self.start + len(self.log)

    def since(self, position: int) -> list[int] | None:
        """Indices changed after `position` (None: unknown, the log was trimmed past it)."""
        i = position - self.start
        if i < 0:
            return None
        return self.log[i:]


@mypyc_attr(native_class=False)  # (its instance dict is read and written directly)
@dataclass(frozen=True)
class ClusterSnapshot:
    """Every worker at one instant, sorted by worker_id, plus cluster-level power facts.

    `changes`: set by an owner that updates this snapshot in place (see `SnapshotChanges`); the core
    then updates what it derived from the snapshot for the changed workers only. None (the default,
    a snapshot built from scratch) means everything may have changed."""

    workers: tuple[WorkerSnapshot, ...]
    time_s: float = 0.0
    measured_power_w: float | None = None  # cluster total from meters, when every worker has one
    changes: SnapshotChanges | None = field(default=None, repr=False, compare=False)
    _by_id: dict[str, WorkerSnapshot] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Built once per snapshot from fields nobody changes (worker_id, pool, role, healthy, KV size):
    # the router reads them for every request. (The simulator updates load fields in place; it never
    # touches these.)
    _decodes: list[WorkerSnapshot] = field(default_factory=list, init=False, repr=False, compare=False)
    _prefills: list[WorkerSnapshot] = field(default_factory=list, init=False, repr=False, compare=False)
    _max_kv_tokens: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ws = self.workers
        if any(ws[i].worker_id >= ws[i + 1].worker_id for i in range(len(ws) - 1)):
            ws = tuple(sorted(ws, key=lambda w: w.worker_id))
            object.__setattr__(self, "workers", ws)
        by_id = {w.worker_id: w for w in ws}
        if len(by_id) != len(ws):
            ids = [w.worker_id for w in ws]
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidRequest(f"duplicate worker ids in snapshot: {', '.join(dup)}")
        object.__setattr__(self, "_by_id", by_id)
        decodes = [w for w in ws if w.healthy and w.role in _DECODE_ROLES]
        object.__setattr__(self, "_decodes", decodes)
        object.__setattr__(self, "_prefills", [w for w in ws if w.healthy and w.role is Role.PREFILL])
        object.__setattr__(self, "_max_kv_tokens", max((w.total_kv_blocks * w.block_size for w in decodes), default=0))

    def worker(self, worker_id: str) -> WorkerSnapshot:
        return self._by_id[worker_id]

    def decode_workers(self) -> list[WorkerSnapshot]:
        """Healthy decode-capable workers (roles decode and both), by worker_id (a new list)."""
        return list(self._decodes)

    def decode_view(self) -> list[WorkerSnapshot]:
        """`decode_workers()` without the copy, for the router's hot path: do not modify it."""
        return self._decodes

    def prefill_view(self) -> list[WorkerSnapshot]:
        """`prefill_workers()` without the copy, for the router's hot path: do not modify it."""
        return self._prefills

    def max_decode_kv_tokens(self) -> int:
        """The largest whole KV cache (tokens) of a healthy decode-capable worker; 0 when none."""
        return self._max_kv_tokens

    def prefill_workers(self, pool: str | None = None) -> list[WorkerSnapshot]:
        """Healthy workers of prefill pools (role prefill), optionally of one pool, by worker_id."""
        if pool is None:
            return list(self._prefills)
        return [w for w in self._prefills if w.pool == pool]


_DECODE_ROLES = (Role.DECODE, Role.BOTH)

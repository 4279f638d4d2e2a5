"""The life of one request, from the HTTP frontend to its last token.

    RECEIVED ──► ADMITTED ──► ROUTED ──┬─► KV_RESERVED ─► PREFILLING ─► TRANSFERRING ─► DECODING ─► FINISHED
       │  ▲         │                  │   (remote prefill: the decode worker reserves blocks, the prefill
       │  │         │                  │    worker computes KV and streams it layer by layer, the decode
       ▼  │         ▼                  │    worker acknowledges and starts decoding)
     QUEUED ◄───────┘                  └─► PREFILLING ─────────────────► DECODING      (local prefill on the
       │   (no capacity or no watts yet: wait, bounded)                                  decode worker)
       ▼
    REJECTED (admission said no: 4xx/429)          any live state ──► CANCELLED (client left) | FAILED

1. The frontend creates the request: RECEIVED.
2. Admission admits it (ADMITTED), parks it in its class queue (QUEUED), or rejects it (REJECTED, the
   API answers 429 with Retry-After, or 4xx for a request that can never run).
3. The router picks a decode worker and, for remote prefill, a prefill worker: ROUTED. When no
   placement fits the power budget the request goes back to QUEUED (or is REJECTED, by config).
4. Remote prefill: the decode worker reserves the request's KV blocks (KV_RESERVED, owner = decode
   worker), the prefill worker runs prefill (PREFILLING, owners = both) and streams KV as each layer
   finishes (TRANSFERRING), the decode worker acknowledges the last layer and the prefill worker
   frees its copy. Local prefill: the decode worker reserves and prefills itself.
5. DECODING until a stop condition: FINISHED. A client that disconnects: CANCELLED. A worker error
   or an expired lease: FAILED.

Every state that holds KV blocks (KV_RESERVED, PREFILLING, TRANSFERRING, DECODING) has at least one
owner — a `KVLease(worker_id, num_blocks, deadline_s)`. A lease not renewed before its deadline
expires; `RequestLifecycle.expire()` then fails the request and hands back every lease so the driver
frees those blocks. Entering a terminal state always hands back every lease: nothing can leak.
Timestamps come from an injected `Clock`, so the simulator and the runtime tell the same story.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from orchestrator.core.ports import Clock
from orchestrator.core.types import TandemError


class RequestState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    ADMITTED = "admitted"
    REJECTED = "rejected"
    ROUTED = "routed"
    KV_RESERVED = "kv_reserved"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def holds_kv(self) -> bool:
        return self in KV_HOLDING


S = RequestState
TERMINAL = frozenset({S.REJECTED, S.FINISHED, S.CANCELLED, S.FAILED})
KV_HOLDING = frozenset({S.KV_RESERVED, S.PREFILLING, S.TRANSFERRING, S.DECODING})
_ENDS = frozenset({S.CANCELLED, S.FAILED})

# The legal transitions: state → the states it may move to.
TRANSITIONS: Mapping[RequestState, frozenset[RequestState]] = {
    S.RECEIVED: frozenset({S.ADMITTED, S.QUEUED, S.REJECTED}) | _ENDS,
    S.QUEUED: frozenset({S.ADMITTED, S.REJECTED}) | _ENDS,
    S.ADMITTED: frozenset({S.ROUTED, S.QUEUED, S.REJECTED}) | _ENDS,
    S.ROUTED: frozenset({S.KV_RESERVED, S.PREFILLING}) | _ENDS,
    S.KV_RESERVED: frozenset({S.PREFILLING}) | _ENDS,
    S.PREFILLING: frozenset({S.TRANSFERRING, S.DECODING}) | _ENDS,
    S.TRANSFERRING: frozenset({S.DECODING}) | _ENDS,
    S.DECODING: frozenset({S.FINISHED}) | _ENDS,
    S.REJECTED: frozenset(),
    S.FINISHED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}


class IllegalTransition(TandemError):
    """A request was moved along an edge the lifecycle does not have."""


class LeaseError(TandemError):
    """A KV-holding state was entered without an owner, or a lease was misused."""


@dataclass(frozen=True)
class KVLease:
    """KV blocks a worker holds for one request, valid until deadline_s (clock seconds)."""

    request_id: str
    worker_id: str
    num_blocks: int
    deadline_s: float


class RequestLifecycle:
    """One request's state machine: legal edges only, timestamps from the clock, KV leases."""

    def __init__(self, request_id: str, clock: Clock, lease_s: float = 30.0) -> None:
        if lease_s <= 0:
            raise LeaseError(f"lease_s must be > 0, got {lease_s}")
        self.request_id = request_id
        self.clock = clock
        self.lease_s = lease_s
        self.state = RequestState.RECEIVED
        self.history: list[tuple[RequestState, float, str]] = [(self.state, clock.now_s(), "")]
        self._leases: dict[str, KVLease] = {}

    # -- queries --

    @property
    def leases(self) -> tuple[KVLease, ...]:
        return tuple(self._leases[k] for k in sorted(self._leases))

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(sorted(self._leases))

    def entered_s(self, state: RequestState) -> float | None:
        """When the request last entered `state`, or None if it never did."""
        for s, t, _ in reversed(self.history):
            if s is state:
                return t
        return None

    def expired(self, now_s: float | None = None) -> list[KVLease]:
        now = self.clock.now_s() if now_s is None else now_s
        return [lease for lease in self.leases if lease.deadline_s < now]

    # -- changes --

    def advance(
        self,
        to: RequestState,
        *,
        hold: Mapping[str, int] | None = None,
        release: Iterable[str] = (),
        note: str = "",
    ) -> list[KVLease]:
        """Move to `to`, first taking leases `hold` (worker_id → blocks) and dropping `release`.

        Returns the leases given up (released, or all of them on entering a terminal state): the
        caller frees exactly those blocks. Raises IllegalTransition for an edge not in TRANSITIONS
        and LeaseError when a KV-holding state would have no owner.
        """
        if to not in TRANSITIONS[self.state]:
            allowed = ", ".join(s.value for s in sorted(TRANSITIONS[self.state], key=lambda s: s.value))
            raise IllegalTransition(
                f"{self.request_id}: {self.state.value} → {to.value} is not a legal transition "
                f"(from {self.state.value}: {allowed or 'none, it is terminal'})"
            )
        now = self.clock.now_s()
        new = dict(self._leases)
        freed: list[KVLease] = []
        for wid in sorted(set(release)):
            if wid not in new:
                raise LeaseError(f"{self.request_id}: {wid} holds no lease to release")
            freed.append(new.pop(wid))
        for wid, n in sorted((hold or {}).items()):
            if n < 0:
                raise LeaseError(f"{self.request_id}: cannot hold {n} blocks on {wid}")
            prev = new.get(wid)
            new[wid] = KVLease(self.request_id, wid, n + (prev.num_blocks if prev else 0), now + self.lease_s)
        if to.terminal:
            freed.extend(new[k] for k in sorted(new))
            new = {}
        elif to.holds_kv and not new:
            raise LeaseError(f"{self.request_id}: state {to.value} holds KV blocks and needs an owner (hold=...)")
        elif not to.holds_kv and new:
            raise LeaseError(
                f"{self.request_id}: state {to.value} holds no KV but leases remain on {', '.join(sorted(new))}"
            )
        self._leases = new
        self.state = to
        self.history.append((to, now, note))
        return freed

    def renew(self, worker_id: str) -> KVLease:
        """Extend a lease by lease_s from now (heartbeat of the owner)."""
        lease = self._leases.get(worker_id)
        if lease is None:
            raise LeaseError(f"{self.request_id}: {worker_id} holds no lease to renew")
        lease = KVLease(self.request_id, worker_id, lease.num_blocks, self.clock.now_s() + self.lease_s)
        self._leases[worker_id] = lease
        return lease

    def expire(self) -> list[KVLease]:
        """If any lease is past its deadline, fail the request and return every lease (to free)."""
        late = self.expired()
        if not late or self.state.terminal:
            return []
        who = ", ".join(f"{lease.worker_id} (deadline {lease.deadline_s:.3f}s)" for lease in late)
        return self.advance(RequestState.FAILED, note=f"KV lease expired: {who}")


class LifecycleTable:
    """Every live request's lifecycle; the place leak checks and lease sweeps look at."""

    def __init__(self, clock: Clock, lease_s: float = 30.0) -> None:
        self.clock = clock
        self.lease_s = lease_s
        self._live: dict[str, RequestLifecycle] = {}

    def start(self, request_id: str) -> RequestLifecycle:
        if request_id in self._live:
            raise LeaseError(f"request id {request_id!r} is already live")
        lc = RequestLifecycle(request_id, self.clock, self.lease_s)
        self._live[request_id] = lc
        return lc

    def get(self, request_id: str) -> RequestLifecycle:
        return self._live[request_id]

    def __iter__(self) -> Iterator[RequestLifecycle]:
        return iter([self._live[k] for k in sorted(self._live)])

    def __len__(self) -> int:
        return len(self._live)

    def forget_terminal(self) -> list[RequestLifecycle]:
        """Drop terminal lifecycles from the table; returns them (for metrics)."""
        done = [lc for lc in self if lc.state.terminal]
        for lc in done:
            del self._live[lc.request_id]
        return done

    def sweep(self) -> list[KVLease]:
        """Expire every request with a late lease; returns all leases to free."""
        out: list[KVLease] = []
        for lc in self:
            out.extend(lc.expire())
        return out

    def held_blocks(self, worker_id: str | None = None) -> int:
        """Blocks held by live leases (on one worker, or all). 0 after a clean run."""
        return sum(
            lease.num_blocks
            for lc in self
            for lease in lc.leases
            if worker_id is None or lease.worker_id == worker_id
        )

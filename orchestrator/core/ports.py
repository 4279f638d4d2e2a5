"""The seams between the pure core and the things that drive it (runtime, simulator, tests).

Each port is a small `typing.Protocol`. Implementations that are tiny live here (the wall and
simulated clocks, the static power meter, in-memory fakes); heavy ones live with their backend
(`orchestrator.runtime` for Ray and NVML, `orchestrator.sim` for the simulated fleet,
`workers.kv_transfer` for gRPC). The core never imports an implementation: it is handed one.

Ports:
- `Clock`        time in seconds (monotonic); wall or simulated.
- `Dispatcher`   turns a `RouteDecision` into work on workers, and cancels it.
- `PowerMeter`   live watts of a worker, or None where no meter exists.
- `KVTransport`  moves a request's KV from a prefill worker to a decode worker.
- `Engine`       what the core needs to know of a worker's engine: its KV block accounting.
- `CostModelPort` the subset of `orchestrator.core.cost_model.CostModel` the router uses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from orchestrator.core.types import KVDtype, LinearMode, TandemError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.core.router import RouteDecision
    from orchestrator.core.snapshot import RouteRequest


# ------------------------------------------------------------------------------------------ clock


@runtime_checkable
class Clock(Protocol):
    def now_s(self) -> float:
        """Seconds on a monotonic clock (origin arbitrary)."""
        ...


class WallClock:
    """The process's monotonic clock."""

    def now_s(self) -> float:
        return time.monotonic()


class SimClock:
    """A clock the simulator (or a test) moves by hand. Never goes backwards."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._t = float(start_s)

    def now_s(self) -> float:
        return self._t

    def advance(self, dt_s: float) -> float:
        if dt_s < 0:
            raise ValueError(f"a clock cannot go backwards (dt_s={dt_s})")
        self._t += dt_s
        return self._t

    def set(self, t_s: float) -> None:
        if t_s < self._t:
            raise ValueError(f"a clock cannot go backwards ({t_s} < {self._t})")
        self._t = float(t_s)


# ------------------------------------------------------------------------------------- dispatcher


class Dispatcher(Protocol):
    def dispatch(self, req: RouteRequest, decision: RouteDecision) -> None:
        """Start the work a routing decision describes (reserve KV, prefill, decode)."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is and free its KV blocks everywhere."""
        ...


class RecordingDispatcher:
    """A fake dispatcher that records what it was asked to do (tests, the contract test)."""

    def __init__(self) -> None:
        self.dispatched: list[tuple[RouteRequest, RouteDecision]] = []
        self.cancelled: list[str] = []

    def dispatch(self, req: RouteRequest, decision: RouteDecision) -> None:
        self.dispatched.append((req, decision))

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


# ------------------------------------------------------------------------------------ power meter


class PowerMeter(Protocol):
    def read_w(self, worker_id: str) -> float | None:
        """Live draw of the worker's accelerator(s) in watts, or None when it has no meter."""
        ...


class StaticPowerMeter:
    """A meter with fixed readings (tests) — None for workers it does not know."""

    def __init__(self, readings_w: Mapping[str, float] | None = None) -> None:
        self.readings_w = dict(readings_w or {})

    def read_w(self, worker_id: str) -> float | None:
        return self.readings_w.get(worker_id)


# ----------------------------------------------------------------------------------- KV transport


class KVTransport(Protocol):
    def send(self, request_id: str, src_worker_id: str, dst_worker_id: str) -> int:
        """Move a request's KV from src to dst; returns the bytes moved. Raises TandemError on failure."""
        ...


class InProcessKVTransport:
    """A fake transport: KV 'moves' instantly; bytes are counted from a per-request size table."""

    def __init__(self, bytes_per_request: Mapping[str, int] | None = None) -> None:
        self.sizes = dict(bytes_per_request or {})
        self.moved: list[tuple[str, str, str, int]] = []

    def send(self, request_id: str, src_worker_id: str, dst_worker_id: str) -> int:
        n = self.sizes.get(request_id, 0)
        self.moved.append((request_id, src_worker_id, dst_worker_id, n))
        return n


# ----------------------------------------------------------------------------------------- engine


class KVBlocksExhausted(TandemError):
    """An engine was asked for more KV blocks than it has free."""


class Engine(Protocol):
    @property
    def free_kv_blocks(self) -> int: ...

    @property
    def total_kv_blocks(self) -> int: ...

    def reserve(self, request_id: str, num_blocks: int) -> None:
        """Hold num_blocks for request_id; KVBlocksExhausted when too few are free."""
        ...

    def free(self, request_id: str) -> int:
        """Release everything request_id holds; returns the blocks freed (0 if none)."""
        ...


class FakeEngine:
    """Block accounting only — what the core's leak checks look at."""

    def __init__(self, total_kv_blocks: int) -> None:
        self._total = total_kv_blocks
        self.held: dict[str, int] = {}

    @property
    def free_kv_blocks(self) -> int:
        return self._total - sum(self.held.values())

    @property
    def total_kv_blocks(self) -> int:
        return self._total

    def reserve(self, request_id: str, num_blocks: int) -> None:
        if num_blocks > self.free_kv_blocks:
            raise KVBlocksExhausted(f"{request_id}: wants {num_blocks} blocks, {self.free_kv_blocks} free")
        self.held[request_id] = self.held.get(request_id, 0) + num_blocks

    def free(self, request_id: str) -> int:
        return self.held.pop(request_id, 0)


# ------------------------------------------------------------------------------------- cost model


class CostModelPort(Protocol):
    """What the router, admission and power accounting ask of the cost model (see cost_model.py)."""

    def prefill_time_s(
        self,
        hw: str,
        num_tokens: int,
        *,
        linear_mode: LinearMode = ...,
        context_tokens: int = 0,
        kv_dtype: KVDtype = ...,
    ) -> float: ...

    def decode_step_time_s(
        self, hw: str, context_lens: Sequence[int], *, linear_mode: LinearMode = ..., kv_dtype: KVDtype = ...
    ) -> float: ...

    def exposed_transfer_time_s(
        self, hw_prefill: str, num_tokens: int, kv_dtype: KVDtype, link: Any = None, *, linear_mode: LinearMode = ...
    ) -> float: ...

    def kv_bytes(self, num_tokens: int, kv_dtype: KVDtype) -> int: ...

    def power_w(self, hw: str, phase: Any, utilization: float) -> float: ...

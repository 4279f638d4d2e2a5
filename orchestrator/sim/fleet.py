"""The simulated fleet: per-worker state the simulator mutates, and fleet power accounting.

A `SimWorker` is one replica of a pool. It holds what the live worker would hold: a prefill
queue (remote prefills on a prefill worker, local prefills on a decode worker), the decode batch
(continuous batching: sequences join and leave at step boundaries), a queue of requests waiting
for KV blocks, and its KV block count. It knows nothing of routing: the simulator puts requests
where the core's router said.

Power is piecewise constant per worker: the cost model's figure for the worker's current phase
(idle, prefill, decode), looked up once per (worker, phase). `FleetPower` integrates the fleet's
total into energy exactly (sum of power × interval) and into fixed-width buckets for the
power-over-time plot; it also records the peak.
"""

from __future__ import annotations

import enum
import math
from array import array
from collections import deque
from typing import Any

from orchestrator.core.types import KVDtype, LinearMode, Role
from orchestrator.sim.workload import SimRequest


class WorkerPhase(enum.IntEnum):
    """What a simulated worker is doing right now (IntEnum: used as a list index in the hot loop)."""

    IDLE = 0
    PREFILL = 1
    DECODE = 2


class FleetPower:
    """Fleet power as a step function of time: exact energy, bucketed averages, peak."""

    __slots__ = ("power_w", "last_t", "energy_j", "peak_w", "bucket_s", "buckets_j", "timeline")

    def __init__(self, bucket_s: float = 1.0, record_timeline: bool = False) -> None:
        self.power_w = 0.0
        self.last_t = 0.0
        self.energy_j = 0.0
        self.peak_w = 0.0
        self.bucket_s = bucket_s
        self.buckets_j = array("d")
        self.timeline: list[tuple[float, float]] | None = [] if record_timeline else None

    def advance(self, t: float) -> None:
        """Integrate the current power from the last change up to t."""
        dt = t - self.last_t
        if dt <= 0.0:
            return
        p = self.power_w
        self.energy_j += p * dt
        b = self.bucket_s
        t0 = self.last_t
        i0 = int(t0 / b)
        i1 = int(t / b)
        buckets = self.buckets_j
        while len(buckets) <= i1:
            buckets.append(0.0)
        if i0 == i1:
            buckets[i0] += p * dt
        else:
            buckets[i0] += p * ((i0 + 1) * b - t0)
            for i in range(i0 + 1, i1):
                buckets[i] += p * b
            buckets[i1] += p * (t - i1 * b)
        self.last_t = t

    def change(self, t: float, delta_w: float) -> None:
        if delta_w == 0.0:
            return
        self.advance(t)
        self.power_w += delta_w
        if self.power_w > self.peak_w:
            self.peak_w = self.power_w
        if self.timeline is not None:
            self.timeline.append((t, self.power_w))

    def start(self, t: float, power_w: float) -> None:
        self.last_t = t
        self.power_w = power_w
        self.peak_w = max(self.peak_w, power_w)
        if self.timeline is not None:
            self.timeline.append((t, power_w))


class SimWorker:
    """One simulated replica. Fields are public and mutated by the simulator only."""

    __slots__ = (
        "index", "worker_id", "pool", "role", "hardware", "linear_mode", "kv_dtype", "block_size",
        "total_blocks", "free_blocks", "max_num_seqs", "max_batch_tokens", "link",
        "prefill_q", "prefill_q_tokens", "reserve_q", "ready", "num_running", "sum_bases", "batch_tokens",
        "step", "phase", "batch", "busy_s", "phase_since", "power_by_phase", "power_w", "energy_j",
        "prefill_batches", "decode_steps", "tokens_out", "prefill_tokens", "snapshot", "extra",
        "finish_heap", "new_joined", "prefill_wait_s", "prefill_waits", "reserve_wait_s", "reserve_waits",
        "max_prefill_q", "max_reserve_q", "pending", "run_bounds", "run_version", "run_len", "step_plans",
        "prefill_memo", "transfer_memo",
    )

    def __init__(self, index: int, worker_id: str, pool: str, role: Role, hardware: Any, *,
                 linear_mode: LinearMode, kv_dtype: KVDtype, block_size: int, total_blocks: int,
                 max_num_seqs: int, max_batch_tokens: int, power_by_phase: tuple[float, float, float],
                 link: Any = None) -> None:
        self.index = index
        self.worker_id = worker_id
        self.pool = pool
        self.role = role
        self.hardware = hardware
        self.linear_mode = linear_mode
        self.kv_dtype = kv_dtype
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.free_blocks = total_blocks
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.link = link
        self.prefill_q: deque[SimRequest] = deque()
        self.prefill_q_tokens = 0
        self.reserve_q: deque[SimRequest] = deque()
        self.ready: list[SimRequest] = []  # KV arrived, waiting for the next step boundary
        self.num_running = 0  # sequences in the decode batch (they sit in finish_heap)
        self.sum_bases = 0  # Σ (prompt_tokens - join_step) over the batch: Σ context = sum_bases + n·step
        self.batch_tokens = 0  # prompt tokens of the prefill batch in flight
        self.step = 0
        self.phase = WorkerPhase.IDLE
        self.batch: list[SimRequest] = []  # the prefill batch in flight
        self.busy_s = 0.0
        self.phase_since = 0.0
        self.power_by_phase = power_by_phase
        self.power_w = power_by_phase[WorkerPhase.IDLE]
        self.energy_j = 0.0
        self.prefill_batches = 0
        self.decode_steps = 0
        self.tokens_out = 0
        self.prefill_tokens = 0
        self.finish_heap: list[tuple[int, int, SimRequest]] = []  # (finish step, request id, request)
        self.new_joined: list[SimRequest] = []  # joined the batch at the current step: first token next
        self.prefill_wait_s = 0.0
        self.prefill_waits = 0
        self.reserve_wait_s = 0.0
        self.reserve_waits = 0
        self.max_prefill_q = 0
        self.max_reserve_q = 0
        self.run_bounds: list[float] = []  # end times of the steps of the decode run in flight
        self.run_len = 8  # steps to compute ahead (doubles, up to RUN_STEPS, each time a run completes)
        self.run_version = 0  # bumped when a run is (re)scheduled: older step-done events are stale
        self.pending = 0  # routed here, blocks held or awaited, not yet in the decode batch
        # batch size → SimCosts.step_plan of this worker (memo)
        self.step_plans: dict[int, tuple[float, float, float, float, int, bool]] = {}
        self.prefill_memo: dict[int, float] = {}  # prompt tokens → time of a one-prompt prefill batch here
        self.transfer_memo: dict[int, float] = {}  # prompt tokens → exposed KV transfer time from here
        self.snapshot: Any = None  # the core's WorkerSnapshot for this worker (kept in sync by the bridge)
        self.extra: dict[str, Any] = {}

    @property
    def does_prefill(self) -> bool:
        return self.role in (Role.PREFILL, Role.BOTH)

    @property
    def does_decode(self) -> bool:
        return self.role in (Role.DECODE, Role.BOTH)

    def set_phase(self, t: float, phase: WorkerPhase, fleet: FleetPower) -> None:
        """Switch phase at time t: close the energy and busy-time interval of the old phase."""
        old = self.phase
        if old is phase:
            return
        dt = t - self.phase_since
        self.energy_j += self.power_w * dt
        if old is not WorkerPhase.IDLE:
            self.busy_s += dt
        new_p = self.power_by_phase[phase]
        fleet.change(t, new_p - self.power_w)
        self.power_w = new_p
        self.phase = phase
        self.phase_since = t

    def close(self, t: float) -> None:
        """Close the current interval at the end of the run (energy and busy time up to t)."""
        dt = t - self.phase_since
        if dt > 0:
            self.energy_j += self.power_w * dt
            if self.phase is not WorkerPhase.IDLE:
                self.busy_s += dt
            self.phase_since = t

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def leak_report(self) -> list[str]:
        """What this worker still holds (empty when it is drained): the simulator's leak check."""
        out = []
        if self.free_blocks != self.total_blocks:
            out.append(f"{self.worker_id}: {self.total_blocks - self.free_blocks} KV blocks not freed")
        if self.num_running or self.sum_bases:
            out.append(f"{self.worker_id}: {self.num_running} sequences still in the decode batch")
        for name in ("prefill_q", "reserve_q", "ready", "batch", "finish_heap"):
            n = len(getattr(self, name))
            if n:
                out.append(f"{self.worker_id}: {n} requests left in {name}")
        return out


def percentile(sorted_values: array | list[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation; nan when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac

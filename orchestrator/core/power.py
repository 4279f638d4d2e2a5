"""Watt budget accounting: what each worker draws now, what a placement would add, what is left.

Power model of one worker (the same step model the simulator integrates):

    P(worker) = reading_w                      when a meter reports one (live telemetry wins)
              = cost_model.power_w(hw, phase, 1.0) for phase = PREFILL if it has prefill work queued,
                                                      DECODE if it has a running batch, else
              = cost_model.power_w(hw, IDLE, 0.0)

A placement raises the prefill worker (the decode worker itself for local prefill) to its PREFILL
power and the decode worker to its DECODE power, never lowering anyone:

    P'(w) = max(P(w), P_phase(hw_w))     for the workers the placement touches
    projected_cluster_w = Σ_w P'(w)      and the same sum per pool

A placement fits when it adds no watts, or when projected_cluster_w ≤ power.cluster_w and every
touched pool with a budget stays within power.pools[pool].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.config.models import PowerConfig
from orchestrator.core.hardware import Phase
from orchestrator.core.ports import CostModelPort
from orchestrator.core.snapshot import ClusterSnapshot, WorkerSnapshot


@dataclass(frozen=True)
class PowerProjection:
    """Cluster and pool power before and after a placement, and whether it fits the budget."""

    before_w: float
    after_w: float
    pool_after_w: Mapping[str, float]
    fits: bool
    why: str  # "" when it fits; else which budget is exceeded, with the numbers

    @property
    def added_w(self) -> float:
        return self.after_w - self.before_w


class PowerAccountant:
    """Per-worker power models and the cluster's watt budget (None = unlimited)."""

    def __init__(self, cost_model: CostModelPort, budget: PowerConfig | None = None) -> None:
        self.cost_model = cost_model
        self.budget = budget
        self._phase_w: dict[tuple[str, Phase], float] = {}
        self._hw_w: dict[str, tuple[float, float, float]] = {}  # hw → (idle, prefill, decode) W
        # the last snapshot's workers tuple and, per worker, (its fields' dict, idle W, prefill W, decode W):
        # the hardware of a worker snapshot never changes, so the rows stay valid while the tuple does
        self._rows_of: tuple[WorkerSnapshot, ...] | None = None
        self._rows: list[tuple[dict[str, Any], float, float, float]] = []

    def phase_w(self, hw: str, phase: Phase) -> float:
        """Modelled draw of hardware `hw` doing `phase` flat out (IDLE: at rest)."""
        key = (hw, phase)
        w = self._phase_w.get(key)
        if w is None:
            w = float(self.cost_model.power_w(hw, phase, 0.0 if phase is Phase.IDLE else 1.0))
            self._phase_w[key] = w
        return w

    @staticmethod
    def worker_phase(w: WorkerSnapshot) -> Phase:
        if w.prefill_busy:
            return Phase.PREFILL
        if w.decode_busy:
            return Phase.DECODE
        return Phase.IDLE

    def worker_w(self, w: WorkerSnapshot) -> float:
        """What the worker draws now: its meter's reading, else the model of its current phase."""
        if w.power_w is not None:
            return w.power_w
        t = self._hw_w.get(w.hardware)
        if t is None:
            t = self._hw_w[w.hardware] = (
                self.phase_w(w.hardware, Phase.IDLE),
                self.phase_w(w.hardware, Phase.PREFILL),
                self.phase_w(w.hardware, Phase.DECODE),
            )
        # the same order as worker_phase: prefill work wins over a running batch
        return t[1] if w.queued_prefill_tokens > 0 else t[2] if w.running_batch > 0 else t[0]

    def cluster_w(self, snap: ClusterSnapshot) -> float:
        return sum(self.worker_w(w) for w in snap.workers)

    def pool_w(self, snap: ClusterSnapshot, pool: str) -> float:
        return sum(self.worker_w(w) for w in snap.workers if w.pool == pool)

    def headroom_w(self, snap: ClusterSnapshot, pool: str | None = None) -> float:
        """Watts left under the cluster budget (or a pool's), inf when there is no budget."""
        if self.budget is None:
            return float("inf")
        if pool is None:
            return self.budget.cluster_w - self.cluster_w(snap)
        cap = self.budget.pools.get(pool)
        return float("inf") if cap is None else cap - self.pool_w(snap, pool)

    def totals(self, snap: ClusterSnapshot) -> tuple[float, dict[str, float]]:
        """(cluster W, W per pool) of a snapshot as it is now."""
        total = 0.0
        pools: dict[str, float] = {}
        hw_w = self._hw_w
        get = pools.get
        for w in snap.workers:  # worker_w inlined (the router calls this for every request)
            now = w.power_w
            if now is None:
                t = hw_w.get(w.hardware)
                if t is None:
                    self.worker_w(w)
                    t = hw_w[w.hardware]
                now = t[1] if w.queued_prefill_tokens > 0 else t[2] if w.running_batch > 0 else t[0]
            total += now
            pools[w.pool] = get(w.pool, 0.0) + now
        return total, pools

    def _power_rows(self, snap: ClusterSnapshot) -> list[tuple[dict[str, Any], float, float, float]]:
        ws = snap.workers
        if ws is not self._rows_of:
            rows = []
            for w in ws:
                t = self._hw_w.get(w.hardware)
                if t is None:
                    t = self._hw_w[w.hardware] = (
                        self.phase_w(w.hardware, Phase.IDLE),
                        self.phase_w(w.hardware, Phase.PREFILL),
                        self.phase_w(w.hardware, Phase.DECODE),
                    )
                rows.append((w.__dict__, *t))  # the fields' dict: cheaper to read than the attributes
            self._rows, self._rows_of = rows, ws
        return self._rows

    def cluster_total_w(self, snap: ClusterSnapshot) -> float:
        """`totals(snap)[0]` (the same float: the same sum in the same order) without the pool sums."""
        total = 0.0
        for f, idle, prefill, decode in self._power_rows(snap):  # worker_w inlined, over each worker's fields
            now = f["power_w"]
            if now is None:
                now = prefill if f["queued_prefill_tokens"] > 0 else decode if f["running_batch"] > 0 else idle
            total += now
        return total

    def after_w(self, before_w: float, prefill: WorkerSnapshot | None, decode: WorkerSnapshot) -> float:
        """`project(...).after_w` from the cluster's draw before (the same float, without the pools)."""
        p = prefill or decode
        now = self.worker_w(p)
        after = before_w + (max(now, self.phase_w(p.hardware, Phase.PREFILL)) - now)
        if prefill is not None:
            now = self.worker_w(decode)
            after += max(now, self.phase_w(decode.hardware, Phase.DECODE)) - now
        return after

    def project(
        self,
        snap: ClusterSnapshot,
        prefill: WorkerSnapshot | None,
        decode: WorkerSnapshot,
        totals: tuple[float, dict[str, float]] | None = None,
    ) -> PowerProjection:
        """Power after placing a request: prefill on `prefill` (None: locally on `decode`).

        `totals` is `self.totals(snap)` when the caller projects several placements on one snapshot."""
        before, pools_before = totals if totals is not None else self.totals(snap)
        pool_after = dict(pools_before)
        p = prefill or decode
        raised = [(p, max(self.worker_w(p), self.phase_w(p.hardware, Phase.PREFILL)))]
        if prefill is not None:
            raised.append((decode, max(self.worker_w(decode), self.phase_w(decode.hardware, Phase.DECODE))))
        after = before
        for w, new in raised:
            delta = new - self.worker_w(w)
            after += delta
            pool_after[w.pool] += delta
        why = ""
        # A placement that adds no watts (its workers already run those phases) always fits:
        # refusing it would not lower the draw.
        if self.budget is not None and after > before:
            if after > self.budget.cluster_w:
                why = f"cluster {after:.0f} W > budget {self.budget.cluster_w:.0f} W"
            else:
                for pool in sorted({w.pool for w, _ in raised}):
                    cap = self.budget.pools.get(pool)
                    if cap is not None and pool_after[pool] > cap:
                        why = f"pool {pool} {pool_after[pool]:.0f} W > budget {cap:.0f} W"
                        break
        return PowerProjection(before, after, pool_after, why == "", why)

"""Contract: the simulator and a runtime-style dispatch loop take the same routing decisions.

The runtime side here is an in-process dispatch loop built only from the core's
public objects and ports, the way `RayDispatcher` uses them: a freshly constructed `Router` (same
config, a separately built cost model), the `RecordingDispatcher` port, and each snapshot rebuilt
through the `ClusterSnapshot(...)` / `WorkerSnapshot(...)` constructors from plain recorded values.
The simulator records every (snapshot, request) it hands its router (the bridge follows
`RayDispatcher`'s sequence: admission → route → FIFO queue pumped on finish); the loop replays that
sequence and must produce the same (request, decode worker, prefill worker, reason) for every
request, in the same order — and the simulator must have executed exactly those placements.

This checks the simulator's side of the seam alone (its in-place snapshot upkeep, its decision log,
a router with no hidden state); the live `RayDispatcher` is compared in test_sim_vs_runtime.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.core.ports import RecordingDispatcher
from orchestrator.core.router import Router
from orchestrator.core.snapshot import ClusterSnapshot, WorkerSnapshot
from orchestrator.sim.build import make_cost_model
from tests.contract.scenarios import SCENARIOS
from tests.unit.sim.factories import make_sim, make_spec, poisson


def _plain(snap: ClusterSnapshot) -> list[dict]:
    """What a runtime would receive as telemetry: plain values per worker."""
    return [dataclasses.asdict(w) for w in snap.workers]


def _dispatch_loop(config, calls) -> RecordingDispatcher:
    router = Router(config, make_cost_model(config))  # runtime-side objects, built independently
    disp = RecordingDispatcher()
    for snap_values, time_s, req in calls:
        snap = ClusterSnapshot(tuple(WorkerSnapshot(**v) for v in snap_values), time_s)
        decision = router.route(req, snap)
        if decision.placed:
            disp.dispatch(req, decision)
    return disp


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_simulator_and_dispatch_loop_route_identically(scenario):
    config = make_spec(**SCENARIOS[scenario])
    sim = make_sim(config, record_route_calls=True, record_decisions=True)
    reqs = poisson(30.0, {"dist": "lognormal", "median": 1200, "sigma": 1.0, "min": 16, "max": 12000},
                   {"dist": "lognormal", "median": 120, "sigma": 0.7, "min": 4, "max": 800}, 400, seed=3)
    rep = sim.run(reqs)
    assert sim.leak_report() == []
    calls = sim.decisions.route_calls
    assert len(calls) >= rep.requests - rep.rejected  # queued requests are offered again
    # the snapshot the simulator keeps in place equals one built from scratch from its workers
    fresh = ClusterSnapshot(tuple(WorkerSnapshot(**v) for v in _plain(sim.decisions.snapshot)), 0.0)
    assert [dataclasses.asdict(w) for w in fresh.workers] == _plain(sim.decisions.snapshot)

    disp = _dispatch_loop(config, [(_plain(s), s.time_s, r) for s, r, _ in calls])
    runtime_keys = [d.key() for _, d in disp.dispatched]
    sim_keys = [d.key() for _, _, d in calls if d.placed]
    assert runtime_keys == sim_keys
    assert len(runtime_keys) == rep.finished  # every finished request was placed exactly once
    # and the simulator executed exactly those placements
    ids = [w.worker_id for w in sim.workers]
    executed = [(f"r{rid}", ids[di], ids[pi] if pi >= 0 else None, reason)
                for rid, di, pi, reason in sim.decision_log]
    assert executed == runtime_keys
    reasons = {k[3] for k in runtime_keys}
    assert len(reasons) >= 2, f"scenario {scenario} exercised only {reasons}"
    if scenario == "power-capped":
        assert "power_capped" in reasons
        assert any(d.reason.value == "over_power_budget" for _, _, d in calls)  # queued, offered again

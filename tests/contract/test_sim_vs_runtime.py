"""Contract (issue 5, point 2): one workload through the simulator and through the runtime's real
`RayDispatcher` (over `orchestrator/runtime/fakes.py` workers, no Ray) takes the same routing decisions.

How the two are made to see the same cluster at every decision:
- The simulator runs first, traced: for every request it records the instants at which the runtime
  could observe a change of its state — its prefill ending (a remote one: `prefill_to` returning at
  the simulator's end of that prefill batch; a local one: the fake decode worker's `"prefilled": True`
  drain frame), the sequence joining a decode batch (a `"decoding": True` frame), and its finish. Those instants come from the core's cost model, through the simulator's batching.
- The runtime side then replays the *arrivals* into `RayDispatcher.submit` on an injected clock, and
  the fake workers reproduce those service instants: each event is delivered at its simulated time,
  after which the asyncio loop is run until quiet. Admission, routing, the FIFO of queued requests,
  the ledger and its snapshot are all the dispatcher's own code; nothing is copied from the simulator.
- Events at one instant are delivered as the simulator orders them: prefill ends, then batch joins,
  then the finishes of one decode step (all together: the dispatcher pumps its queue once after
  completions that land in the same loop pass), then arrivals.

The service instants are the simulator's, so they are exact only while both sides placed every
request identically — which is exactly what is asserted: the first differing decision is the failure.
The workloads are Poisson bursts (30 req/s onto 5 decode workers), so requests queue on prefill
workers, in decode batches and — in the power-capped case — in admission's FIFO.

In the power-capped case a finish that frees power lets queued requests through one at a time on
both sides: the simulator's `CoreBridge.drain` yields each placement and the simulator dispatches it
(taking its blocks and prefill tokens, hence modelled power) before the router sees the next request,
as `RayDispatcher` reserves each placement before routing the next.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from orchestrator.core.router import Router
from orchestrator.core.types import SamplingParams
from orchestrator.runtime.api_types import GenerationRequest
from orchestrator.runtime.dispatcher import RayDispatcher
from orchestrator.runtime.fakes import FakeDeployment
from orchestrator.sim.build import make_cost_model
from orchestrator.sim.simulator import Simulator
from tests.contract.scenarios import SCENARIOS
from tests.unit.sim.factories import make_sim, make_spec, poisson

NUM_REQUESTS = 250

PREFILL_DONE, JOIN, FINISH, ARRIVAL = range(4)  # the order of events at one instant


class _TracingSimulator(Simulator):
    """The simulator, recording (time, kind, request id) of what the runtime's workers would report."""

    trace: list[tuple[float, int, int]]

    def _on_prefill_done(self, w):  # type: ignore[no-untyped-def]
        t = self.loop.now_s
        for req in w.batch:
            self.trace.append((t, PREFILL_DONE, req.request_id))
        return super()._on_prefill_done(w)

    def _iterate(self, w, t):  # type: ignore[no-untyped-def]
        before = list(w.ready)
        ev = super()._iterate(w, t)
        for req in before[:len(before) - len(w.ready)]:  # joined the batch (taken from the front)
            self.trace.append((t, JOIN, req.request_id))
        return ev


def _run_sim(config, reqs, sim_class=_TracingSimulator):
    sim = make_sim(config, record_decisions=True)
    sim.__class__ = sim_class  # same object, traced handlers
    sim.trace = []
    rep = sim.run(reqs)
    assert sim.leak_report() == []
    ids = [w.worker_id for w in sim.workers]
    decisions = [(f"r{rid}", ids[di], ids[pi] if pi >= 0 else None, reason)
                 for rid, di, pi, reason in sim.decision_log]
    events = list(sim.trace)
    events += [(r.finish_s, FINISH, r.request_id) for r in reqs if r.finish_s >= 0]
    events += [(r.arrival_s, ARRIVAL, r.request_id) for r in reqs]
    return sim, rep, decisions, sorted(events)


async def _settle() -> None:
    for _ in range(40):
        await asyncio.sleep(0)


def _run_runtime(config, sim, reqs, events):
    dep = FakeDeployment(config, hold=True, hold_prefill=True)
    for w in sim.workers:  # the simulated KV geometry (the sim sizes caches from the cost model)
        dep.workers[w.worker_id].info["num_total_blocks"] = w.total_blocks
    now = [0.0]
    disp = RayDispatcher(config, dep, router=Router(config, make_cost_model(config)),
                         clock=lambda: now[0], record_routes=True)
    by_id = {r.request_id: r for r in reqs}
    where: dict[int, tuple[str, str | None]] = {}
    outcome: dict[str, str] = {}

    async def client(rid: int) -> None:
        r = by_id[rid]
        gen = GenerationRequest(f"r{rid}", [1] * r.prompt_tokens, SamplingParams(max_tokens=r.output_tokens),
                                r.sla_class)
        try:
            stream = await disp.submit(gen)
        except Exception as e:  # a refusal is a decision too: compared below
            outcome[gen.request_id] = type(e).__name__
            return
        where[rid] = (stream.decode.worker_id, stream.prefill.worker_id if stream.prefill else None)
        n = 0
        async for chunk in stream:
            n += len(chunk.token_ids)
        outcome[gen.request_id] = f"finished {n}"

    async def main() -> None:
        tasks = []
        groups: dict[float, list[tuple[int, int]]] = defaultdict(list)
        for t, kind, rid in events:
            groups[t].append((kind, rid))
        for t in sorted(groups):
            now[0] = t
            group = sorted(groups[t])
            for kind in (PREFILL_DONE, JOIN, FINISH):
                todo = [rid for k, rid in group if k == kind]
                for rid in todo:
                    if rid not in where:  # the runtime placed differently: stop, compare decisions
                        return
                    d, p = where[rid]
                    if kind == PREFILL_DONE and p is None:
                        dep.impls[d].end_local_prefill(f"r{rid}")
                    elif kind == PREFILL_DONE:
                        dep.impls[p].finish_prefill(f"r{rid}")
                    elif kind == JOIN:
                        dep.impls[d].start_decoding(f"r{rid}")
                    else:
                        dep.impls[d].release(f"r{rid}")
                if todo:
                    await _settle()
            for k, rid in group:
                if k == ARRIVAL:
                    tasks.append(asyncio.ensure_future(client(rid)))
                    await _settle()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    async def run() -> None:
        try:
            await main()
        finally:
            await disp.drain_and_close(timeout_s=0.1)

    asyncio.run(run())
    return disp, dep, outcome


def _workload():
    return poisson(30.0, {"dist": "lognormal", "median": 1200, "sigma": 1.0, "min": 16, "max": 12000},
                   {"dist": "lognormal", "median": 120, "sigma": 0.7, "min": 4, "max": 800}, NUM_REQUESTS, seed=3)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_simulator_and_ray_dispatcher_route_identically(scenario):
    config = make_spec(**SCENARIOS[scenario])
    reqs = _workload()
    sim, rep, sim_keys, events = _run_sim(config, reqs)
    assert rep.finished == NUM_REQUESTS and rep.rejected == 0
    assert all(w.max_reserve_q == 0 for w in sim.workers)  # no request ever waited for blocks it was routed to

    disp, dep, outcome = _run_runtime(config, sim, reqs, events)
    runtime_keys = [d.key() for d in disp.route_log or [] if d.placed]
    for i, (a, b) in enumerate(zip(sim_keys, runtime_keys, strict=False)):
        assert a == b, f"decision {i} differs: simulator {a}, runtime {b}"
    assert runtime_keys == sim_keys
    finished = {rid: f"finished {r.output_tokens}" for rid, r in ((f"r{r.request_id}", r) for r in reqs)}
    assert outcome == finished
    # nothing left behind: no queued request, no ledger entry, no live request on a fake worker
    assert dep.check_leaks() == [] and not disp._queue and not disp._streams
    snap = disp.snapshot()
    assert all(w.queued_prefill_tokens == 0 and w.running_batch == 0 and w.waiting == 0
               and w.free_kv_blocks == w.total_kv_blocks for w in snap.workers)
    reasons = {k[3] for k in runtime_keys}
    assert len(reasons) >= 2, f"scenario {scenario} exercised only {reasons}"
    if scenario == "power-capped":
        assert "power_capped" in reasons
        refused = [d for d in disp.route_log or [] if d.reason.value == "over_power_budget"]
        assert refused, "the power cap never queued a request"
    if scenario == "threshold":
        assert {k[2] is None for k in runtime_keys} == {True, False}  # local and remote prefills both

"""The simulator's fast paths of the SIMPERF pass give the very same run: arrivals merged into the
event order, memory-bound decode runs, the decode-run length policy (tests/unit/sim/test_simulator_mechanics.py
covers runs against one event per step)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import HardwareCatalog
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import KVDtype, LinearMode
from orchestrator.sim.costs import SimCosts
from orchestrator.sim.events import EventLoop, SimulationError
from tests.unit.sim.factories import make_sim, make_spec, poisson

POOLS = [
    {"name": "prefill", "role": "prefill", "replicas": 2, "hardware": "h100-sxm"},
    {"name": "decode", "role": "decode", "replicas": 3, "hardware": "gaudi2", "engine": {"max_batch_size": 12}},
]


def _trace(merged: bool, arrivals: list[float], follow: list[list[float]]) -> list[tuple[float, str]]:
    """Run arrivals whose handlers schedule follow-up events (same instants included) either merged
    (run_merged) or through the heap, each arrival scheduling the next one first (the old way)."""
    loop = EventLoop()
    seen: list[tuple[float, str]] = []

    def later(tag):
        seen.append((loop.now_s, tag))

    def arrive(i):
        seen.append((loop.now_s, f"a{i}"))
        return [(loop.now_s + dt, later, f"f{i}.{j}") for j, dt in enumerate(follow[i])]

    if merged:
        loop.run_merged(iter(range(len(arrivals))), arrive, arrivals.__getitem__)
    else:
        def arrive_and_next(i):
            out = arrive(i)
            return out if i + 1 == len(arrivals) else [(arrivals[i + 1], arrive_and_next, i + 1), *out]

        loop.schedule(arrivals[0], arrive_and_next, 0)
        loop.run()
    return seen


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=12))
def test_merged_arrivals_run_in_the_order_of_self_scheduling_arrivals(spec):
    # integer instants: many ties between arrivals and follow-ups, which only the sequence numbers order
    arrivals, t = [], 0.0
    for gap, _ in spec:
        t += gap
        arrivals.append(t)
    follow = [[float(x) for x in f] for _, f in spec]
    assert _trace(True, arrivals, follow) == _trace(False, arrivals, follow)


def test_merged_arrivals_out_of_order_are_an_error_and_until_keeps_the_next():
    loop = EventLoop()
    with pytest.raises(SimulationError, match="not in time order"):
        loop.run_merged(iter([(1.0, 0), (0.5, 1)]), lambda _: None, lambda a: a[0])
    loop = EventLoop()
    assert loop.run_merged(iter([(1.0, 0), (3.0, 1)]), lambda _: None, lambda a: a[0], until_s=2.0) == 1.0
    assert loop.pending_arrival == (3.0, 1) and loop.events_run == 1


def test_a_simulation_stopped_early_leaves_its_next_arrival_unrun():
    sim = make_sim(make_spec(pools=POOLS, routing={"kind": "context-ttft"}))
    rep = sim.run(poisson(25.0, 900, 150, 400, seed=2), until_s=5.0)
    assert sim.arrived < 400 and sim.loop.pending_arrival is not None
    assert rep.requests == sim.arrived


def _summary(rep):
    d = rep.to_dict()
    d.pop("events")
    return d


def test_memory_bound_decode_runs_equal_the_general_step_loop(monkeypatch):
    cfg = make_spec(pools=POOLS, routing={"kind": "context-ttft"})
    wl = lambda: poisson(25.0, {"dist": "lognormal", "median": 900, "sigma": 1.0, "min": 8, "max": 9000},  # noqa: E731
                         {"dist": "lognormal", "median": 150, "sigma": 0.8, "min": 1, "max": 900}, 1500, seed=7)
    fast = make_sim(cfg).run(wl())
    general = SimCosts.step_plan

    def never_memory_bound(self, hw, batch, *, linear_mode, kv_dtype):
        return (*general(self, hw, batch, linear_mode=linear_mode, kv_dtype=kv_dtype)[:5], False)

    monkeypatch.setattr(SimCosts, "step_plan", never_memory_bound)
    slow = make_sim(cfg).run(wl())
    assert fast.ttft_s_sorted == slow.ttft_s_sorted and fast.tpot_s_sorted == slow.tpot_s_sorted
    assert _summary(fast) == _summary(slow)


@pytest.mark.parametrize("shape", ["llama-3.1-8b-shape", "llama-3.1-70b-shape"])
def test_memory_bound_flag_holds_for_the_float_comparison_it_replaces(shape):
    catalog = HardwareCatalog.load_default()
    costs = SimCosts(CostModel(PRESETS[shape], catalog))
    per_ctx = costs.attention_flops_per_context_token
    rng = random.Random(5)
    flagged = 0
    for hw in catalog:
        for kv in KVDtype:
            for batch in (1, 3, 64, 256):
                head, elem, flops_s, bytes_s, kv_bytes, bound = costs.step_plan(
                    hw, batch, linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=kv)
                flagged += bound
                for _ in range(200):
                    ctx = rng.choice([0, batch, rng.randint(0, 256 * 128_000)])
                    compute = per_ctx * ctx / flops_s
                    memory = kv_bytes * (ctx + batch) / bytes_s
                    if bound:
                        assert not compute > memory, (hw, kv, batch, ctx)
    assert flagged > 0  # the shipped catalog's decode steps are memory-bound in attention


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**40), st.floats(0.5, 500.0), st.floats(1.0, 5000.0), st.floats(0.0, 2.5),
       st.floats(1.0, 800.0), st.floats(0.0, 2.0), st.integers(1, 64), st.integers(64, 20000))
def test_poisson_lognormal_stream_draws_what_the_samplers_draw(seed, rate, p_med, p_sigma, o_med, o_sigma,
                                                               lo, hi):
    from orchestrator.sim.workload import (
        _poisson_lognormal,
        _sampled,
        interarrival_sampler,
        length_sampler,
        parse_workload,
    )

    arrival = {"process": "poisson", "rate_rps": rate}
    p = {"dist": "lognormal", "median": p_med, "sigma": p_sigma, "min": lo, "max": hi}
    o = {"dist": "lognormal", "median": o_med, "sigma": o_sigma, "min": lo, "max": hi}
    raw = {"seed": seed, "arrival": arrival, "prompt_tokens": p, "output_tokens": o, "sla_class": "x"}
    spec = parse_workload(raw)
    fast = spec.requests(300)
    assert fast.__name__ == _poisson_lognormal.__name__  # the written-out stream is the one used
    plain = _sampled(random.Random(seed), interarrival_sampler(arrival), length_sampler(p, "p"),
                     length_sampler(o, "o"), "x", 300)

    def key(r):
        return (r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, r.sla_class)

    assert [key(r) for r in fast] == [key(r) for r in plain]

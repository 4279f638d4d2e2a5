"""Simulator mechanics: determinism, decode runs equal to one event per step, batching limits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import orchestrator.sim.simulator as simulator_mod
from orchestrator.sim.traces import estimate_tokens
from tests.unit.sim.factories import make_requests, make_sim, make_spec, poisson

POOLS = [
    {"name": "prefill", "role": "prefill", "replicas": 2, "hardware": "h100-sxm"},
    {"name": "decode", "role": "decode", "replicas": 3, "hardware": "gaudi2", "engine": {"max_batch_size": 12}},
]


def _workload(n=1500, seed=4):
    return poisson(25.0, {"dist": "lognormal", "median": 900, "sigma": 1.0, "min": 8, "max": 9000},
                   {"dist": "lognormal", "median": 150, "sigma": 0.8, "min": 1, "max": 900}, n, seed=seed)


def _summary(rep):
    d = rep.to_dict()
    d.pop("events")
    for p in d["pools"]:
        p.pop("decode_steps")  # counted per step either way, but keep the comparison to outcomes
    return d


def test_same_inputs_same_report():
    cfg = make_spec(pools=POOLS, routing={"kind": "context-ttft"})
    a = make_sim(cfg).run(_workload())
    b = make_sim(cfg).run(_workload())
    assert a.to_dict() == b.to_dict()
    assert a.ttft_s_sorted == b.ttft_s_sorted


def test_decode_runs_give_the_same_result_as_one_event_per_step(monkeypatch):
    cfg = make_spec(pools=POOLS, routing={"kind": "context-ttft"})
    fast_sim = make_sim(cfg)
    fast = fast_sim.run(_workload())
    monkeypatch.setattr(simulator_mod, "RUN_STEPS", 1)
    slow_sim = make_sim(cfg)
    for w in slow_sim.workers:
        w.run_len = 1
    slow = slow_sim.run(_workload())
    assert slow.events > fast.events * 2  # the runs really coalesce steps
    assert fast.ttft_s_sorted == slow.ttft_s_sorted  # bit for bit
    assert fast.tpot_s_sorted == slow.tpot_s_sorted
    assert _summary(fast) == _summary(slow)
    assert [w.decode_steps for w in fast_sim.workers] == [w.decode_steps for w in slow_sim.workers]


def test_decode_batch_never_exceeds_max_batch_size():
    cfg = make_spec(pools=POOLS, routing={"kind": "threshold", "threshold_tokens": 0})
    sim = make_sim(cfg)
    seen = []
    orig = sim._iterate

    def spy(w, t):
        ev = orig(w, t)
        seen.append(w.num_running)
        return ev

    sim._iterate = spy
    rep = sim.run(poisson(200.0, 200, 400, 600, seed=1))
    assert rep.finished == 600
    assert max(seen) == 12  # reached, never passed


def test_prefill_batch_respects_token_budget_and_takes_at_least_one():
    cfg = make_spec(pools=[POOLS[0] | {"replicas": 1}, POOLS[1]], routing={"kind": "threshold", "threshold_tokens": 0})
    sim = make_sim(cfg, max_batch_tokens=1000)
    batches = []
    orig = sim._on_prefill_done

    def spy(w):
        batches.append([r.prompt_tokens for r in w.batch])
        return orig(w)

    sim._on_prefill_done = spy
    reqs = make_requests([(0.0, 5000, 2)] + [(0.001 * i, 300, 2) for i in range(1, 9)])
    rep = sim.run(reqs)
    assert rep.finished == 9
    assert batches[0] == [5000]  # longer than the budget: alone
    assert all(sum(b) <= 1000 for b in batches[1:]) and max(len(b) for b in batches) == 3


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_estimate_tokens_is_positive_and_subadditive(text):
    n = estimate_tokens(text)
    assert n >= 1
    assert n <= max(1, len(text))  # never more tokens than characters
    half = len(text) // 2
    assert n <= estimate_tokens(text[:half]) + estimate_tokens(text[half:]) + 1

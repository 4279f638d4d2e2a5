"""The power budget: the cap holds where the preferred placement would exceed it; the power policy."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import NoFitAction, PowerConfig
from orchestrator.core.power import PowerAccountant
from orchestrator.core.router import Router, RouteReason
from orchestrator.core.snapshot import ClusterSnapshot, WorkerSnapshot
from orchestrator.core.types import KVDtype, LinearMode, Role

from .factories import catalog, cost_model, decode, make_config, prefill, req, snapshot

MODE = LinearMode.FP8_DYNAMIC
KV = KVDtype.FP8_E4M3


def draw_w(w: WorkerSnapshot) -> float:
    """What the worker draws now, straight from the catalog (independent of PowerAccountant)."""
    if w.power_w is not None:
        return w.power_w
    spec = catalog()[w.hardware]
    if w.queued_prefill_tokens > 0:
        return spec.prefill_power_w
    if w.running_batch > 0:
        return spec.decode_power_w
    return spec.idle_w


def after_w(snap: ClusterSnapshot, prefill_id: str | None, decode_id: str) -> float:
    total = 0.0
    for w in snap.workers:
        spec = catalog()[w.hardware]
        now = draw_w(w)
        if w.worker_id == (prefill_id or decode_id):
            now = max(now, spec.prefill_power_w)
        elif prefill_id is not None and w.worker_id == decode_id:
            now = max(now, spec.decode_power_w)
        total += now
    return total


def two_h100_one_gaudi(**power):
    cfg = make_config(
        pools=[
            {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 2},
            {"name": "decode", "role": "decode", "hardware": "gaudi2"},
        ],
        power=power,
    )
    snap = snapshot(prefill("p0"), prefill("p1"), decode("d0", running_batch=4))
    return Router(cfg, cost_model()), snap


def test_the_cap_holds_where_the_preferred_placement_would_exceed_it():
    # long prompt: context-ttft prefers remote on an idle H100 (73 → 697 W), which breaks 1000 W
    router, snap = two_h100_one_gaudi(cluster_w=1000)
    free = Router(make_config(pools=[dict(p) for p in (
        {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 2},
        {"name": "decode", "role": "decode", "hardware": "gaudi2"},
    )]), cost_model())
    unconstrained = free.route(req(8000), snap)
    assert unconstrained.reason is RouteReason.REMOTE_FASTER
    assert after_w(snap, unconstrained.prefill_worker_id, "d0") > 1000  # the scenario would exceed the cap

    d = router.route(req(8000), snap)
    assert d.placed and d.reason is RouteReason.POWER_CAPPED and d.local_prefill
    assert d.predicted_power_w == pytest.approx(after_w(snap, None, "d0"))
    assert d.predicted_power_w <= 1000
    assert "over budget (cluster" in d.arithmetic and "> budget 1000 W" in d.arithmetic


@pytest.mark.parametrize("action", [NoFitAction.QUEUE, NoFitAction.REJECT])
def test_nothing_fits_queues_or_rejects_with_the_reason(action):
    router, snap = two_h100_one_gaudi(cluster_w=600, on_no_fit=action.value)
    assert after_w(snap, None, "d0") > 600 and after_w(snap, "p0", "d0") > 600
    d = router.route(req(8000), snap)
    assert not d.placed and d.reason is RouteReason.OVER_POWER_BUDGET and d.no_fit is action
    assert d.retry_after_s is not None and d.retry_after_s >= 1
    assert "none fits" in d.arithmetic and "budget 600 W" in d.arithmetic


def test_a_placement_that_adds_no_watts_always_fits():
    # the H100 is already prefilling and the Gaudi decoding: a remote placement on them adds nothing
    router, _ = two_h100_one_gaudi(cluster_w=600)
    snap = snapshot(prefill("p0", queued_prefill_tokens=100), prefill("p1", power_w=10.0),
                    decode("d0", running_batch=4))
    assert PowerAccountant(cost_model()).cluster_w(snap) > 600
    d = router.route(req(8000), snap)
    assert d.placed and d.prefill_worker_id == "p0"


def test_pool_budget_and_live_readings():
    router, snap = two_h100_one_gaudi(cluster_w=5000, pools={"prefill": 700})
    d = router.route(req(8000), snap)  # remote would put the prefill pool at 697 + 73 = 770 W > 700 W
    assert d.reason is RouteReason.POWER_CAPPED and d.local_prefill and "pool prefill 770 W > budget 700 W" in d.arithmetic
    # a live reading replaces the model: p1 reads 600 W (the model would say idle, 73 W), so even
    # local prefill (Gaudi 400 → 490 W) breaks 1100 W: 73 + 600 + 490 = 1163 W
    router, _ = two_h100_one_gaudi(cluster_w=1100)
    hot = snapshot(prefill("p0"), prefill("p1", power_w=600.0), decode("d0", running_batch=4))
    cold = snapshot(prefill("p0"), prefill("p1"), decode("d0", running_batch=4))
    assert after_w(hot, None, "d0") == pytest.approx(1163)
    assert router.route(req(8000), cold).placed
    d = router.route(req(8000), hot)
    assert not d.placed and d.reason is RouteReason.OVER_POWER_BUDGET
    # a reading at or above the phase's power means the placement adds nothing there: it fits
    busy = snapshot(prefill("p0"), prefill("p1"), decode("d0", running_batch=4, power_w=950.0))
    d = router.route(req(8000), busy)
    assert d.placed and d.local_prefill and d.predicted_power_w == pytest.approx(73 + 73 + 950)


def power_cluster(
    sla_ttft_ms: float = 60_000, sla_tpot_ms: float = 10_000, cluster_w: float = 10_000, queued: int = 0
):
    cfg = make_config(
        pools=[
            {"name": "h100", "role": "prefill", "hardware": "h100-sxm"},
            {"name": "l4", "role": "decode", "hardware": "l4"},
            {"name": "gaudi", "role": "decode", "hardware": "gaudi2"},
        ],
        routing={"kind": "power"},
        power={"cluster_w": cluster_w},
        sla={"default": "s", "classes": [{"name": "s", "ttft_ms": sla_ttft_ms, "tpot_ms": sla_tpot_ms}]},
    )
    snap = snapshot(
        prefill("p0", "h100-sxm", "h100", queued_prefill_tokens=queued),
        decode("l0", "l4", "l4"),
        decode("g0", "gaudi2", "gaudi"),
    )
    return Router(cfg, cost_model()), snap


def energy_j(n: int, m: int, p_hw: str, d_hw: str, batch: int = 1) -> float:
    cm, cat = cost_model(), catalog()
    pre = cm.prefill_time_s(p_hw, n, linear_mode=MODE, kv_dtype=KV) * cat[p_hw].prefill_power_w
    step = cm.decode_step_time_s(d_hw, [n + m // 2] * batch, linear_mode=MODE, kv_dtype=KV)
    return pre + m * step * cat[d_hw].decode_power_w / batch


def test_power_policy_takes_the_fewest_joules_that_meet_the_sla():
    router, snap = power_cluster()
    n, m = 2000, 128
    options = {
        ("l0", None): energy_j(n, m, "l4", "l4"),
        ("g0", None): energy_j(n, m, "gaudi2", "gaudi2"),
        ("l0", "p0"): energy_j(n, m, "h100-sxm", "l4"),
        ("g0", "p0"): energy_j(n, m, "h100-sxm", "gaudi2"),
    }
    best = min(options, key=options.__getitem__)
    d = router.route(req(n, max_tokens=m), snap)
    assert d.reason is RouteReason.LEAST_ENERGY
    assert (d.decode_worker_id, d.prefill_worker_id) == best
    assert d.predicted_energy_j == pytest.approx(options[best])
    assert "fewest J/token of 4/4" in d.arithmetic


def test_power_policy_pays_joules_to_meet_a_tight_ttft():
    # the H100 has 20k tokens queued: remote prefill is still the cheapest in joules (queueing costs
    # no energy) but no longer the fastest
    n, m = 2000, 16
    loose, snap = power_cluster(queued=20_000)
    cheapest = loose.route(req(n, max_tokens=m), snap)
    assert cheapest.reason is RouteReason.LEAST_ENERGY and cheapest.prefill_worker_id == "p0"
    # a TTFT target just under the cheapest placement's: only faster, costlier ones qualify
    tight, _ = power_cluster(sla_ttft_ms=cheapest.predicted_ttft_ms * 0.999, queued=20_000)
    d = tight.route(req(n, max_tokens=m), snap)
    assert d.reason is RouteReason.LEAST_ENERGY
    assert d.predicted_ttft_ms < cheapest.predicted_ttft_ms
    assert d.predicted_energy_j > cheapest.predicted_energy_j
    # nothing meets 1 µs: the fastest placement, marked as a miss
    hopeless, _ = power_cluster(sla_ttft_ms=0.001, queued=20_000)
    d = hopeless.route(req(n, max_tokens=m), snap)
    assert d.reason is RouteReason.SLA_MISS_FASTEST
    assert d.predicted_ttft_ms == pytest.approx(min(
        loose.estimator.estimate(req(n, m), snap.worker(dw), None if pw is None else snap.worker(pw)).ttft_ms
        for dw, pw in (("l0", None), ("g0", None), ("l0", "p0"), ("g0", "p0"))
    ))


HW = ["h100-sxm", "gaudi2", "l4"]


@st.composite
def clusters(draw):
    workers = []
    for i in range(draw(st.integers(1, 3))):
        workers.append(WorkerSnapshot(
            f"p{i}", "prefill", Role.PREFILL, "h100-sxm", healthy=draw(st.booleans()),
            queued_prefill_tokens=draw(st.sampled_from([0, 0, 500, 8000])),
            free_kv_blocks=10_000, total_kv_blocks=10_000,
            power_w=draw(st.none() | st.floats(50, 900)),
        ))
    for i in range(draw(st.integers(1, 3))):
        hw = draw(st.sampled_from(["gaudi2", "l4"]))
        workers.append(WorkerSnapshot(
            f"d{i}", "gaudi" if hw == "gaudi2" else "l4", Role.DECODE, hw, healthy=draw(st.booleans()),
            queued_prefill_tokens=draw(st.sampled_from([0, 0, 300])), running_batch=draw(st.integers(0, 40)),
            waiting=draw(st.integers(0, 3)), free_kv_blocks=draw(st.integers(0, 2000)), total_kv_blocks=2000,
            power_w=draw(st.none() | st.floats(10, 600)),
        ))
    return ClusterSnapshot(tuple(workers))


@functools.cache
def _fleet_config(kind: str):
    routing = {"kind": kind, "threshold_tokens": 1024} if kind == "threshold" else {"kind": kind}
    return make_config(
        pools=[
            {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 3},
            {"name": "gaudi", "role": "decode", "hardware": "gaudi2"},
            {"name": "l4", "role": "decode", "hardware": "l4"},
        ],
        routing=routing,
        power={"cluster_w": 5000},
    )


@pytest.mark.parametrize("kind", ["context-ttft", "threshold", "power"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=clusters(), n=st.integers(1, 16000), m=st.integers(1, 512), budget=st.floats(400, 4000))  # fleet idle: 385 W
def test_router_never_exceeds_the_budget_and_is_deterministic(kind, snap, n, m, budget):
    cfg = _fleet_config(kind).model_copy(update={"power": PowerConfig(cluster_w=budget)})
    router = Router(cfg, cost_model())
    r = req(n, max_tokens=m)
    d = router.route(r, snap)
    again = Router(cfg, cost_model()).route(r, ClusterSnapshot(tuple(reversed(snap.workers))))
    assert d == again
    before = sum(draw_w(w) for w in snap.workers)
    if d.placed:
        after = after_w(snap, d.prefill_worker_id, d.decode_worker_id)
        assert after <= budget + 1e-6 or after <= before + 1e-6
        assert d.predicted_power_w == pytest.approx(after)
        w = snap.worker(d.decode_worker_id)
        assert w.healthy and w.role is Role.DECODE and w.fits(r)
    elif d.reason is RouteReason.OVER_POWER_BUDGET:
        # every placement on the least-loaded decode worker really adds watts past the budget
        fit = [w for w in snap.workers if w.healthy and w.role is Role.DECODE and w.fits(r)]
        dw = min(fit, key=lambda w: (w.running_batch + w.waiting, -w.free_kv_blocks, w.worker_id))
        for pw in [None] + [w.worker_id for w in snap.workers if w.healthy and w.role is Role.PREFILL]:
            after = after_w(snap, pw, dw.worker_id)
            assert after > budget and after > before
        assert d.no_fit is NoFitAction.QUEUE


def test_headroom_queries():
    router, snap = two_h100_one_gaudi(cluster_w=1000, pools={"prefill": 700})
    now = sum(draw_w(w) for w in snap.workers)  # 73 + 73 + 400
    assert now == pytest.approx(546)
    assert router.power.headroom_w(snap) == pytest.approx(1000 - 546)
    assert router.power.headroom_w(snap, "prefill") == pytest.approx(700 - 146)
    assert router.power.headroom_w(snap, "decode") == float("inf")  # no pool budget
    assert PowerAccountant(cost_model()).headroom_w(snap) == float("inf")  # no budget at all

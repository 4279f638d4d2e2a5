"""The router's fast paths change no decision: admission's evaluation handed to `route`, the
snapshot's cached worker lists, the estimator's memo, the lazily formatted arithmetic."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.admission import Admission, AdmissionAction, QueueView
from orchestrator.core.router import Router, RouteReason
from orchestrator.core.types import KVDtype, LinearMode

from .factories import cost_model, decode, make_config, prefill, req, snapshot

MODE = LinearMode.FP8_DYNAMIC
KV = KVDtype.FP8_E4M3

POOLS = [
    {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 2},
    {"name": "prefill-b", "role": "prefill", "hardware": "h200", "replicas": 1},
    {"name": "decode", "role": "decode", "hardware": "gaudi2", "replicas": 2},
    {"name": "decode-b", "role": "decode", "hardware": "l4", "replicas": 1},
]
CONFIGS = {
    "context-ttft": make_config(pools=POOLS),
    "context-ttft-capped": make_config(pools=POOLS, power={"cluster_w": 1500}),
    "power": make_config(pools=POOLS, routing={"kind": "power"}, power={"cluster_w": 2500}),
    "threshold": make_config(pools=POOLS, routing={"kind": "threshold", "threshold_tokens": 2048}),
}

load = st.tuples(st.integers(0, 9000), st.integers(0, 40), st.integers(0, 3), st.integers(0, 600))


def fleet(loads):
    (q0, _, _, _), (q1, _, _, _), (q2, _, _, _) = loads[:3]
    ds = []
    for i, (q, rb, wt, free) in enumerate(loads[3:]):
        hw, pool = ("l4", "decode-b") if i == 2 else ("gaudi2", "decode")
        ds.append(decode(f"d{i}", hardware=hw, pool=pool, queued_prefill_tokens=q, running_batch=rb, waiting=wt,
                         free=free, total=600))
    return snapshot(prefill("p0", queued_prefill_tokens=q0), prefill("p1", queued_prefill_tokens=q1),
                    prefill("p2", hardware="h200", pool="prefill-b", queued_prefill_tokens=q2), *ds)


def best_ttft_reference_ms(r, snap, router: Router) -> float | None:
    """Admission's best TTFT written out from the cost model (no memo, no evaluation object)."""
    cm = cost_model()
    fitting = [w for w in snap.decode_workers() if w.free_kv_blocks * w.block_size >= r.kv_tokens]
    if not fitting:
        return None
    d = min(fitting, key=lambda w: (w.running_batch + w.waiting, -w.free_kv_blocks, w.worker_id))

    def pf(hw, n):
        return cm.prefill_time_s(hw, n, linear_mode=MODE, kv_dtype=KV) if n > 0 else 0.0

    best = (pf(d.hardware, d.queued_prefill_tokens) + pf(d.hardware, r.prompt_tokens)) * 1e3
    for p in snap.prefill_workers():
        x = cm.exposed_transfer_time_s(p.hardware, r.prompt_tokens, KV, router.estimator.link, linear_mode=MODE)
        best = min(best, (pf(p.hardware, p.queued_prefill_tokens) + pf(p.hardware, r.prompt_tokens) + x) * 1e3)
    return best


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(sorted(CONFIGS)),
    loads=st.lists(load, min_size=6, max_size=6),
    prompts=st.lists(st.tuples(st.integers(1, 12_000), st.integers(1, 2000)), min_size=1, max_size=4),
)
def test_admission_evaluation_reused_by_route_gives_the_fresh_decision(kind, loads, prompts):
    cfg = CONFIGS[kind]
    snap = fleet(loads)
    warm = Router(cfg, cost_model())  # memo shared across requests, like the simulator's
    adm = Admission(cfg, warm)
    for i, (n, m) in enumerate(prompts):
        r = req(n, m, rid=f"r{i}")
        decision = adm.decide(r, snap, QueueView({}))
        if adm.last_evaluation is None:
            assert decision.action is AdmissionAction.REJECT
            continue
        assert warm.best_ttft_ms(r, snap) == best_ttft_reference_ms(r, snap, warm)
        reused = warm.route(r, snap, adm.last_evaluation)
        fresh = Router(cfg, cost_model()).route(r, snap)  # nothing memoised, no evaluation
        assert reused == fresh  # every field, the formatted arithmetic included
        assert reused.arithmetic == fresh.arithmetic and reused.key() == fresh.key()


def test_an_evaluation_of_another_request_or_snapshot_is_not_used():
    cfg = CONFIGS["context-ttft"]
    router = Router(cfg, cost_model())
    busy = snapshot(prefill("p0"), decode("d0", free=10), decode("d1", free=600, running_batch=30))
    idle = snapshot(prefill("p0"), decode("d0", free=600), decode("d1", free=600, running_batch=30))
    small, big = req(64, 16, rid="small"), req(8000, 16, rid="big")
    ev_small = router.evaluate(small, busy)
    assert [w.worker_id for w in ev_small.decodes] == ["d0", "d1"]
    # d0 cannot hold the big request: an evaluation made for the small one must not place it there
    assert router.route(big, busy, ev_small).decode_worker_id == "d1"
    # an evaluation of the busy snapshot must not be used on another snapshot
    ev_big = router.evaluate(big, busy)
    assert router.route(big, idle, ev_big).decode_worker_id == "d0"


def test_snapshot_worker_views_are_cached_but_handed_out_as_copies():
    snap = snapshot(prefill("p0"), prefill("p1", healthy=False), decode("d0", total=100),
                    decode("d1", total=900, healthy=False), decode("d2", total=300))
    assert [w.worker_id for w in snap.decode_workers()] == ["d0", "d2"]
    assert [w.worker_id for w in snap.prefill_workers()] == ["p0"]
    assert snap.max_decode_kv_tokens() == 300 * 16  # the unhealthy d1 does not count
    got = snap.decode_workers()
    got.clear()
    assert len(snap.decode_workers()) == 2 and len(snap.decode_view()) == 2
    assert snapshot(prefill("p0")).max_decode_kv_tokens() == 0


def test_arithmetic_is_formatted_on_first_read_and_compared_as_text():
    cfg = CONFIGS["context-ttft-capped"]
    snap = fleet([(0, 0, 0, 0)] * 3 + [(0, 4, 0, 600)] * 3)
    a = Router(cfg, cost_model()).route(req(3000, 64), snap)
    b = Router(cfg, cost_model()).route(req(3000, 64), snap)
    assert not isinstance(a.arithmetic_text, str)  # nothing formatted yet
    assert a == b and hash(a) == hash(b)
    assert isinstance(a.arithmetic_text, str) and a.arithmetic == b.arithmetic
    assert a.reason in (RouteReason.LOCAL_FASTER, RouteReason.REMOTE_FASTER, RouteReason.POWER_CAPPED)
    assert "W" in a.arithmetic and a.arithmetic.count("ms") >= 2


@settings(max_examples=40, deadline=None)
@given(loads=st.lists(load, min_size=6, max_size=6), n=st.integers(1, 12_000))
def test_unbudgeted_route_reports_the_projected_power_of_the_full_projection(loads, n):
    router = Router(CONFIGS["context-ttft"], cost_model())
    snap = fleet(loads)
    d = router.route(req(n, 64), snap)
    if not d.placed:
        return
    pw = router.power
    pre = None if d.prefill_worker_id is None else snap.worker(d.prefill_worker_id)
    proj = pw.project(snap, pre, snap.worker(d.decode_worker_id))
    assert proj.fits and d.predicted_power_w == proj.after_w
    assert pw.cluster_total_w(snap) == pw.totals(snap)[0]

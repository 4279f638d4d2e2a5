"""Router policies on crafted cluster snapshots: crossovers computed from the cost model, both sides."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import NoFitAction
from orchestrator.core.router import Router, RouteReason
from orchestrator.core.types import KVDtype, LinearMode, Role

from .factories import cost_model, decode, make_config, prefill, req, snapshot, worker

MODE = LinearMode.FP8_DYNAMIC
KV = KVDtype.FP8_E4M3


def ttft_local_ms(n: int, hw: str = "gaudi2", queued: int = 0) -> float:
    cm = cost_model()
    q = cm.prefill_time_s(hw, queued, linear_mode=MODE, kv_dtype=KV) if queued else 0.0
    return (q + cm.prefill_time_s(hw, n, linear_mode=MODE, kv_dtype=KV)) * 1e3


def ttft_remote_ms(n: int, hw: str = "h100-sxm", queued: int = 0) -> float:
    cm = cost_model()
    q = cm.prefill_time_s(hw, queued, linear_mode=MODE, kv_dtype=KV) if queued else 0.0
    p = cm.prefill_time_s(hw, n, linear_mode=MODE, kv_dtype=KV)
    x = cm.exposed_transfer_time_s(hw, n, KV, None, linear_mode=MODE)
    return (q + p + x) * 1e3


def crossover(pred, lo: int = 1, hi: int = 30_000) -> int:
    """Smallest n in [lo, hi] with pred(n) true, given pred false at lo and true at hi (monotone)."""
    assert not pred(lo) and pred(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("queued_prefill", [0, 4000])
@pytest.mark.parametrize("margin_ms", [0.0, 5.0])
def test_context_ttft_flips_exactly_at_the_cost_model_crossover(queued_prefill, margin_ms):
    cfg = make_config(routing={"kind": "context-ttft", "remote_margin_ms": margin_ms})
    router = Router(cfg, cost_model())
    snap = snapshot(prefill("p0", queued_prefill_tokens=queued_prefill), decode("d0"))

    def remote_wins(n: int) -> bool:
        return ttft_remote_ms(n, queued=queued_prefill) + margin_ms < ttft_local_ms(n)

    n_star = crossover(remote_wins)
    below = router.route(req(n_star - 1, max_tokens=1), snap)
    at = router.route(req(n_star, max_tokens=1), snap)
    assert below.reason is RouteReason.LOCAL_FASTER and below.local_prefill and below.decode_worker_id == "d0"
    assert at.reason is RouteReason.REMOTE_FASTER and at.prefill_worker_id == "p0" and at.decode_worker_id == "d0"
    assert at.predicted_ttft_ms == pytest.approx(ttft_remote_ms(n_star, queued=queued_prefill))
    assert below.predicted_ttft_ms == pytest.approx(ttft_local_ms(n_star - 1))
    # the arithmetic names both sides with their numbers
    for d in (below, at):
        assert "local d0" in d.arithmetic and "remote p0→d0" in d.arithmetic and "exposed transfer" in d.arithmetic
    assert at.arithmetic.endswith("remote") and below.arithmetic.endswith("local")


def test_a_queued_prefill_worker_moves_the_crossover_up():
    cfg = make_config()
    router = Router(cfg, cost_model())
    idle = snapshot(prefill("p0"), decode("d0"))
    busy = snapshot(prefill("p0", queued_prefill_tokens=8000), decode("d0"))
    n_idle = crossover(lambda n: ttft_remote_ms(n) < ttft_local_ms(n))
    n_busy = crossover(lambda n: ttft_remote_ms(n, queued=8000) < ttft_local_ms(n))
    assert n_busy > n_idle
    mid = (n_idle + n_busy) // 2
    assert router.route(req(mid), idle).reason is RouteReason.REMOTE_FASTER
    assert router.route(req(mid), busy).reason is RouteReason.LOCAL_FASTER


def test_context_ttft_picks_the_fastest_prefill_worker_ties_by_id():
    router = Router(make_config(), cost_model())
    snap = snapshot(
        prefill("p2"), prefill("p1"), prefill("p0", queued_prefill_tokens=2000), decode("d0")
    )
    d = router.route(req(8000), snap)
    assert d.reason is RouteReason.REMOTE_FASTER and d.prefill_worker_id == "p1"  # p1, p2 tie: lower id


def test_colocated_cluster_prefills_where_it_decodes():
    cfg = make_config(pools=[{"name": "c", "role": "both", "hardware": "h100-sxm", "replicas": 2}])
    router = Router(cfg, cost_model())
    snap = snapshot(worker("c0", "c", Role.BOTH, "h100-sxm", running_batch=3), worker("c1", "c", Role.BOTH, "h100-sxm"))
    d = router.route(req(5000), snap)
    assert d.reason is RouteReason.COLOCATED and d.decode_worker_id == "c1" and d.prefill_worker_id is None


@pytest.mark.parametrize("threshold", [1, 512, 4096])
def test_threshold_flips_at_the_threshold(threshold):
    cfg = make_config(routing={"kind": "threshold", "threshold_tokens": threshold})
    router = Router(cfg, cost_model())
    snap = snapshot(prefill("p0"), decode("d0"))
    at = router.route(req(threshold), snap)
    assert at.reason is RouteReason.AT_OR_ABOVE_THRESHOLD and at.prefill_worker_id == "p0"
    assert f"prompt {threshold} >= threshold {threshold}" in at.arithmetic
    if threshold > 1:
        below = router.route(req(threshold - 1), snap)
        assert below.reason is RouteReason.BELOW_THRESHOLD and below.local_prefill


def test_threshold_without_healthy_prefill_worker_falls_back_to_local():
    cfg = make_config(routing={"kind": "threshold", "threshold_tokens": 10})
    router = Router(cfg, cost_model())
    d = router.route(req(100), snapshot(prefill("p0", healthy=False), decode("d0")))
    assert d.reason is RouteReason.NO_PREFILL_WORKER and d.local_prefill and d.decode_worker_id == "d0"


def test_tiers_send_each_length_to_its_pool():
    cfg = make_config(
        pools=[
            {"name": "h100", "role": "prefill", "hardware": "h100-sxm"},
            {"name": "h200", "role": "prefill", "hardware": "h200"},
            {"name": "decode", "role": "decode", "hardware": "l4"},
        ],
        routing={
            "kind": "tiers",
            "tiers": [
                {"min_prompt_tokens": 0, "pool": None},
                {"min_prompt_tokens": 256, "pool": "h100"},
                {"min_prompt_tokens": 8192, "pool": "h200"},
            ],
        },
    )
    router = Router(cfg, cost_model())
    snap = snapshot(prefill("a0", "h100-sxm", "h100"), prefill("b0", "h200", "h200"), decode("d0", "l4"))
    got = {n: router.route(req(n), snap) for n in (1, 255, 256, 8191, 8192, 30000)}
    assert [got[n].prefill_worker_id for n in (1, 255, 256, 8191, 8192, 30000)] == [None, None, "a0", "a0", "b0", "b0"]
    assert got[1].reason is RouteReason.TIER_LOCAL and got[256].reason is RouteReason.TIER_REMOTE
    down = snapshot(prefill("a0", "h100-sxm", "h100"), prefill("b0", "h200", "h200", healthy=False), decode("d0", "l4"))
    assert router.route(req(9000), down).reason is RouteReason.NO_PREFILL_WORKER


def test_least_loaded_decode_worker():
    router = Router(make_config(), cost_model())
    p = prefill("p0")
    # fewest running + waiting wins
    snap = snapshot(p, decode("d0", running_batch=5), decode("d1", running_batch=2, waiting=1), decode("d2", running_batch=4))
    assert router.route(req(10), snap).decode_worker_id == "d1"
    # equal load: most free blocks wins; equal again: lowest id
    snap = snapshot(p, decode("d0", free=100), decode("d1", free=900), decode("d2", free=900))
    assert router.route(req(10), snap).decode_worker_id == "d1"
    # a worker without room for prompt + max_tokens is skipped (block_size 16: 100+60 tokens → 10 blocks)
    snap = snapshot(p, decode("d0", free=9), decode("d1", free=10, running_batch=50))
    assert router.route(req(100, max_tokens=60), snap).decode_worker_id == "d1"
    # unhealthy ones too
    snap = snapshot(p, decode("d0", healthy=False), decode("d1", running_batch=7))
    assert router.route(req(10), snap).decode_worker_id == "d1"


def test_no_room_queues_and_no_worker_rejects():
    router = Router(make_config(), cost_model())
    full = router.route(req(100, max_tokens=60), snapshot(prefill("p0"), decode("d0", free=9), decode("d1", free=3)))
    assert not full.placed and full.reason is RouteReason.NO_KV_CAPACITY and full.no_fit is NoFitAction.QUEUE
    assert "needs 10 KV blocks" in full.arithmetic and "9 on d0" in full.arithmetic
    never = router.route(req(100, max_tokens=60), snapshot(prefill("p0"), decode("d0", free=9, total=9)))
    assert never.reason is RouteReason.NO_KV_CAPACITY and never.no_fit is NoFitAction.REJECT
    assert "no decode worker has that many blocks at all" in never.arithmetic
    none = router.route(req(10), snapshot(prefill("p0"), decode("d0", healthy=False)))
    assert not none.placed and none.reason is RouteReason.NO_DECODE_WORKER and none.no_fit is NoFitAction.REJECT


def test_decision_is_independent_of_worker_order():
    router = Router(make_config(), cost_model())
    ws = [prefill("p0", queued_prefill_tokens=100), prefill("p1"), decode("d0"), decode("d1")]
    a = router.route(req(3000), snapshot(*ws))
    b = router.route(req(3000), snapshot(*reversed(ws)))
    assert a == b and a.prefill_worker_id == "p1" and a.decode_worker_id == "d0"


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 20_000),
    q_p=st.lists(st.sampled_from([0, 100, 2000, 9000]), min_size=1, max_size=3),
    q_d=st.sampled_from([0, 50, 3000]),
    margin=st.sampled_from([0.0, 2.0, 20.0]),
)
def test_context_ttft_matches_the_cost_model_oracle(n, q_p, q_d, margin):
    """For any queues: remote iff min_p T(p) + margin < T(local), with T straight from the cost model."""
    router = _ctx_router(margin)
    prefills = [prefill(f"p{i}", queued_prefill_tokens=q) for i, q in enumerate(q_p)]
    snap = snapshot(*prefills, decode("d0", queued_prefill_tokens=q_d))
    remote = min((ttft_remote_ms(n, queued=q), f"p{i}") for i, q in enumerate(q_p))
    local = ttft_local_ms(n, queued=q_d)
    d = router.route(req(n), snap)
    if remote[0] + margin < local:
        assert d.reason is RouteReason.REMOTE_FASTER and d.prefill_worker_id == remote[1]
        assert d.predicted_ttft_ms == pytest.approx(remote[0])
    else:
        assert d.reason is RouteReason.LOCAL_FASTER and d.local_prefill
        assert d.predicted_ttft_ms == pytest.approx(local)


@functools.cache
def _ctx_router(margin: float) -> Router:
    return Router(make_config(routing={"kind": "context-ttft", "remote_margin_ms": margin}), cost_model())

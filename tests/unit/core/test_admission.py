"""Admission: admit, queue, or reject with the right HTTP status and a Retry-After."""

from __future__ import annotations

import pytest

from orchestrator.core.admission import Admission, AdmissionAction, AdmissionReason, QueueView
from orchestrator.core.metrics import DecisionCounters
from orchestrator.core.ports import FakeEngine, InProcessKVTransport, KVBlocksExhausted, RecordingDispatcher
from orchestrator.core.router import Router, RouteReason
from orchestrator.core.snapshot import InvalidRequest, RouteRequest

from .factories import cost_model, decode, make_config, prefill, req, snapshot

SLA = {
    "default": "chat",
    "classes": [
        {"name": "chat", "ttft_ms": 400, "tpot_ms": 100},
        {"name": "batch", "ttft_ms": 60_000, "tpot_ms": 1000},
    ],
}
ADM = {"max_waiting": 5, "default_queue_cap": 3, "queue_caps": {"batch": 4}, "min_retry_after_s": 2}


def setup(**over):
    cfg = make_config(sla=over.pop("sla", SLA), admission=over.pop("admission", ADM), **over)
    router = Router(cfg, cost_model())
    return Admission(cfg, router), router


IDLE = snapshot(prefill("p0"), decode("d0"))


def test_admits_when_the_class_can_be_met():
    adm, router = setup()
    d = adm.decide(req(500), IDLE, QueueView())
    assert d.action is AdmissionAction.ADMIT and d.sla_class == "chat" and d.http_status == 200
    assert d.retry_after_s is None
    assert f"{router.best_ttft_ms(req(500), IDLE):.0f}ms" in d.detail


def test_unreachable_sla_gets_429_with_retry_after():
    adm, router = setup()
    busy = snapshot(prefill("p0", queued_prefill_tokens=60_000), decode("d0", queued_prefill_tokens=60_000))
    best = router.best_ttft_ms(req(500), busy)
    assert best is not None and best > 400  # the arithmetic of the scenario: nothing meets chat's 400 ms
    d = adm.decide(req(500), busy, QueueView())
    assert d.action is AdmissionAction.REJECT and d.reason is AdmissionReason.SLA_UNREACHABLE
    assert d.http_status == 429 and d.retry_after_s >= 2
    assert d.retry_after_s == max(2, -(-(best - 400) // 1000))
    # the batch class tolerates it
    ok = adm.decide(req(500, sla_class="batch"), busy, QueueView())
    assert ok.action is AdmissionAction.ADMIT and ok.sla_class == "batch"


def test_queue_caps_per_class_then_429():
    adm, _ = setup()
    q = QueueView({"chat": 2})
    d = adm.decide(req(10), IDLE, q)
    assert d.action is AdmissionAction.QUEUE and d.reason is AdmissionReason.QUEUED_BEHIND  # FIFO behind 2
    d = adm.decide(req(10), IDLE, QueueView({"chat": 3}))  # chat's cap is 3 (default_queue_cap)
    assert d.action is AdmissionAction.REJECT and d.reason is AdmissionReason.QUEUE_FULL
    assert d.http_status == 429 and d.retry_after_s >= 2 and "3/3" in d.detail
    d = adm.decide(req(10, sla_class="batch"), IDLE, QueueView({"batch": 3}))
    assert d.action is AdmissionAction.QUEUE  # batch's own cap is 4
    d = adm.decide(req(10, sla_class="batch"), IDLE, QueueView({"batch": 3, "chat": 2}))
    assert d.action is AdmissionAction.REJECT and "5/5" in d.detail  # max_waiting over all classes


def test_no_kv_room_queues():
    adm, _ = setup()
    full = snapshot(prefill("p0"), decode("d0", free=1))
    d = adm.decide(req(100), full, QueueView())
    assert d.action is AdmissionAction.QUEUE and d.reason is AdmissionReason.NO_KV_CAPACITY


@pytest.mark.parametrize(
    "request_, snap, reason, status",
    [
        (RouteRequest("a", 10, 10, "gold"), IDLE, AdmissionReason.UNKNOWN_SLA_CLASS, 400),
        (RouteRequest("b", 30_000, 3_000), IDLE, AdmissionReason.CONTEXT_TOO_LONG, 400),
        (RouteRequest("c", 10, 10), snapshot(prefill("p0"), decode("d0", healthy=False)),
         AdmissionReason.NO_HEALTHY_WORKER, 503),
        (RouteRequest("e", 1000, 1000), snapshot(prefill("p0"), decode("d0", free=10, total=100)),
         AdmissionReason.EXCEEDS_KV_CAPACITY, 400),  # 2000 tokens > 100 blocks × 16
    ],
)
def test_requests_that_can_never_run(request_, snap, reason, status):
    adm, _ = setup()
    d = adm.decide(request_, snap, QueueView())
    assert d.action is AdmissionAction.REJECT and d.reason is reason and d.http_status == status
    assert d.retry_after_s is not None


def test_power_queue_is_bounded():
    adm, router = setup(power={"cluster_w": 500, "queue_cap": 2})
    snap = snapshot(prefill("p0"), decode("d0", running_batch=2))
    routed = router.route(req(8000), snap)
    assert routed.reason is RouteReason.OVER_POWER_BUDGET
    d = adm.queue_for_power(req(8000), QueueView({"chat": 1}), routed.arithmetic)
    assert d.action is AdmissionAction.QUEUE and d.reason is AdmissionReason.POWER_QUEUED
    d = adm.queue_for_power(req(8000), QueueView({"chat": 1, "batch": 1}), routed.arithmetic)
    assert d.action is AdmissionAction.REJECT and d.reason is AdmissionReason.OVER_POWER_BUDGET
    assert d.http_status == 429 and "none fits" in d.detail


def test_request_validation():
    with pytest.raises(InvalidRequest):
        RouteRequest("x", 0, 10)
    with pytest.raises(InvalidRequest):
        RouteRequest("x", 10, -1)


def test_a_mixed_workload_end_to_end_through_the_fakes_counts_every_decision():
    """Admission → router → dispatcher → engine blocks → finish: counters match, nothing leaks."""
    adm, router = setup(routing={"kind": "threshold", "threshold_tokens": 1000})
    engines = {"d0": FakeEngine(60), "d1": FakeEngine(60)}
    disp, kv, counters = RecordingDispatcher(), InProcessKVTransport(), DecisionCounters()
    lengths = [10, 5000, 200, 2000, 1500, 30, 7000, 999, 1000, 64]
    queued = 0
    for i, n in enumerate(lengths):
        r = req(n, max_tokens=32, rid=f"q{i}")
        snap = snapshot(prefill("p0"), *(decode(w, free=e.free_kv_blocks, total=60) for w, e in engines.items()))
        a = adm.decide(r, snap, QueueView())
        counters.record_admission(a)
        if a.action is not AdmissionAction.ADMIT:
            queued += 1
            continue
        d = router.route(r, snap)
        counters.record_route(d)
        assert d.placed
        disp.dispatch(r, d)
        engines[d.decode_worker_id].reserve(r.request_id, -(-r.kv_tokens // 16))
        if not d.local_prefill:
            kv.send(r.request_id, d.prefill_worker_id, d.decode_worker_id)
    admitted = len(disp.dispatched)
    assert admitted + queued == len(lengths)
    by = counters.routes_by_reason()
    assert by.get("below_threshold", 0) == sum(1 for r, _ in disp.dispatched if r.prompt_tokens < 1000)
    assert by.get("at_or_above_threshold", 0) == len(kv.moved) == counters.remote_prefills
    assert counters.as_dict()["admissions"]["admitted"] == admitted
    # out of blocks: 7000 + 32 tokens wants 442 blocks, more than any engine has
    with pytest.raises(KVBlocksExhausted):
        engines["d0"].reserve("big", 1000)
    for r, d in disp.dispatched:
        engines[d.decode_worker_id].free(r.request_id)
    assert all(e.free_kv_blocks == e.total_kv_blocks for e in engines.values())

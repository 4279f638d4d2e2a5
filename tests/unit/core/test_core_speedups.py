"""The core's speed-ups of the SIMPERF pass change no answer: written-out dataclass inits, the
one-pass decode order, the fused prefill scan, the power rows, the cost model's GEMM memo."""

from __future__ import annotations

import dataclasses
import inspect
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config.models import NoFitAction, RoutingKind
from orchestrator.core.admission import AdmissionAction, AdmissionDecision, AdmissionReason
from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import GemmKind
from orchestrator.core.model_shape import get_shape
from orchestrator.core.router import DecodeOrder, RouteDecision, Router, RouteReason
from orchestrator.core.snapshot import InvalidRequest, RouteRequest
from orchestrator.core.types import KVDtype, LinearMode

from .factories import catalog, cost_model, decode, make_config, prefill, req, snapshot

POOLS = [
    {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 3},
    {"name": "prefill-b", "role": "prefill", "hardware": "h200", "replicas": 2},
    {"name": "decode", "role": "decode", "hardware": "gaudi2", "replicas": 3},
    {"name": "decode-b", "role": "decode", "hardware": "l4", "replicas": 2},
]


@pytest.mark.parametrize("cls", [RouteDecision, AdmissionDecision, RouteRequest])
def test_written_out_inits_take_the_fields_in_order_with_their_defaults(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        want = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert p.default == want, f.name


def test_written_out_inits_build_equal_frozen_objects():
    a = RouteDecision("r1", RoutingKind.CONTEXT_TTFT, RouteReason.LOCAL_FASTER, "x", "d0", None, 1.5, None, None, 9.0)
    b = RouteDecision(request_id="r1", policy=RoutingKind.CONTEXT_TTFT, reason=RouteReason.LOCAL_FASTER,
                      arithmetic_text=lambda: "x", decode_worker_id="d0", predicted_ttft_ms=1.5, predicted_power_w=9.0)
    assert a == b and hash(a) == hash(b) and a.no_fit is None and a.retry_after_s is None
    assert dataclasses.replace(a, no_fit=NoFitAction.QUEUE).no_fit is NoFitAction.QUEUE
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.reason = RouteReason.REMOTE_FASTER  # type: ignore[misc]
    d = AdmissionDecision("r1", AdmissionAction.ADMIT, AdmissionReason.ADMITTED, "c", "ok")
    assert d == AdmissionDecision("r1", AdmissionAction.ADMIT, AdmissionReason.ADMITTED, "c", "ok", None)
    assert dataclasses.asdict(d)["detail"] == "ok" and d.http_status == 200
    r = RouteRequest("r2", 10, 5)
    assert (r.sla_class, r.arrival_s, r.kv_tokens) == (None, 0.0, 15)
    for bad in ((0, 5), (10, 0), (1.5, 5)):
        with pytest.raises(InvalidRequest):
            RouteRequest("bad", *bad)


load = st.tuples(st.integers(0, 9000), st.integers(0, 40), st.integers(0, 3), st.integers(0, 600))


def _fleet(loads):
    ps = [prefill(f"p{i}", queued_prefill_tokens=loads[i][0]) for i in range(3)]
    ps += [prefill(f"p{i}", hardware="h200", pool="prefill-b", queued_prefill_tokens=loads[i][0]) for i in (3, 4)]
    ds = []
    for i, (q, rb, wt, free) in enumerate(loads[5:]):
        hw, pool = ("l4", "decode-b") if i >= 3 else ("gaudi2", "decode")
        ds.append(decode(f"d{i}", hardware=hw, pool=pool, queued_prefill_tokens=q, running_batch=rb, waiting=wt,
                         free=free, total=600))
    return snapshot(*ps, *ds)


@settings(max_examples=80, deadline=None)
@given(loads=st.lists(load, min_size=10, max_size=10), n=st.integers(1, 12_000), m=st.integers(1, 2000))
def test_decode_order_first_is_the_sorted_order_head(loads, n, m):
    snap = _fleet(loads)
    r = req(n, m)
    order = DecodeOrder(r, snap.decode_view())
    full = Router._fitting(r, snap.decode_view())
    assert bool(order) == bool(full)
    if full:
        assert order[0] is full[0] and order.first is full[0]
    assert list(order) == full and len(order) == len(full) and order == full
    assert list(order[1:]) == full[1:]


@settings(max_examples=80, deadline=None)
@given(loads=st.lists(load, min_size=10, max_size=10), n=st.integers(1, 12_000), m=st.integers(1, 2000))
def test_fused_prefill_scan_equals_the_two_separate_scans(loads, n, m):
    snap = _fleet(loads)
    router = Router(make_config(pools=POOLS), cost_model())
    est = router.estimator
    r = req(n, m)
    d = snap.decode_view()[0]
    local = est.ttft_ms(r, d, False)
    best, (p, q, pf, tr) = est.remote_scan(r, snap.prefill_view(), local)
    assert best == est.remote_best_ttft_ms(r, snap.prefill_view(), local)
    want = est.fastest_remote(r, d, snap.prefill_view())  # no hint set: its own scan
    assert want is not None and p is not None and p.worker_id == want.prefill_worker_id
    assert (q * 1e3, pf * 1e3, tr * 1e3) == (want.queue_ms, want.prefill_ms, want.transfer_ms)
    assert est.local_s(d, n) == (est.prefill_s(d, d.queued_prefill_tokens), est.prefill_s(d, n))


def test_power_rows_follow_in_place_load_changes():
    router = Router(make_config(pools=POOLS), cost_model())
    snap = _fleet([(0, 0, 0, 600)] * 10)
    pw = router.power
    idle = pw.cluster_total_w(snap)
    object.__setattr__(snap.workers[0], "queued_prefill_tokens", 500)  # as the simulator's bridge does
    object.__setattr__(snap.workers[7], "running_batch", 3)
    busy = pw.cluster_total_w(snap)
    manual = 0.0
    for w in snap.workers:
        manual += pw.worker_w(w)
    assert busy == pw.totals(snap)[0] == manual and busy > idle


def test_gemm_memo_equals_the_hardware_spec_for_every_device_and_kind():
    cm = CostModel(get_shape("llama-3.1-8b-shape"), catalog())
    rng = random.Random(3)
    for hw in catalog():
        spec = cm.spec(hw)
        for kind in GemmKind:
            for _ in range(20):
                m, k, n = rng.randint(1, 20000), rng.randint(1, 16384), rng.randint(1, 131072)
                assert cm.gemm_time_s(hw, m, k, n, kind) == spec.gemm_time_s(m, k, n, kind), (hw, kind)


def test_one_prompt_prefill_memo_is_shared_and_equal_to_the_unmemoised_sum():
    cm = CostModel(get_shape("llama-3.1-8b-shape"), catalog())
    for hw in ("h100-sxm", "gaudi2", "l4"):
        for n in (1, 17, 1000, 8191):
            for mode in LinearMode:
                want = cm._prefill(cm.spec(hw), [(n, 0)], mode, KVDtype.FP8_E4M3)
                assert cm.prefill_time_s(hw, n, linear_mode=mode) == want
                assert cm.prefill_batch_time_s(hw, [n], linear_mode=mode) == want
        assert cm.prefill_batch_time_s(hw, [3, 4]) == cm._prefill(cm.spec(hw), [(3, 0), (4, 0)],
                                                                   LinearMode.FP8_DYNAMIC, KVDtype.FP8_E4M3)


def test_admitted_detail_formatted_on_first_read_equals_the_eager_text():
    import pickle

    lazy = AdmissionDecision._formatted_later("r1", AdmissionAction.ADMIT, AdmissionReason.ADMITTED, "c",
                                              "best predicted TTFT {:.0f}ms <= {:.0f}ms", 123.5, 1000.0)
    eager = AdmissionDecision("r1", AdmissionAction.ADMIT, AdmissionReason.ADMITTED, "c",
                              f"best predicted TTFT {123.5:.0f}ms <= {1000.0:.0f}ms")
    again = pickle.loads(pickle.dumps(lazy))
    assert "detail" not in lazy.__dict__
    assert lazy == eager and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
    assert lazy.detail == "best predicted TTFT 124ms <= 1000ms" and again.detail == lazy.detail
    assert dataclasses.asdict(again) == dataclasses.asdict(eager)
    with pytest.raises(AttributeError):
        lazy.no_such_field  # noqa: B018

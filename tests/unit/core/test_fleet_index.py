"""`FleetIndex` (the router's views of a snapshot kept up to date from its change log) gives the very
answers of the plain scans: the same least-loaded decode worker, the same prefill scan floats and
worker, the same cluster power — and a router reading a logged snapshot decides exactly as one
reading a fresh copy of it. Random fleets, random in-place changes (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.admission import Admission, AdmissionAction, QueueView
from orchestrator.core.fleet_index import FleetIndex
from orchestrator.core.power import PowerAccountant
from orchestrator.core.router import DecodeOrder, Router
from orchestrator.core.snapshot import ClusterSnapshot, SnapshotChanges, WorkerSnapshot
from orchestrator.core.types import Role

from .factories import cost_model, make_config, req

POOLS = [
    {"name": "pa", "role": "prefill", "hardware": "h100-sxm", "replicas": 4},
    {"name": "pb", "role": "prefill", "hardware": "h200", "replicas": 2},
    {"name": "da", "role": "decode", "hardware": "gaudi2", "replicas": 3},
    {"name": "db", "role": "decode", "hardware": "l4", "replicas": 2},
    {"name": "both", "role": "both", "hardware": "a100", "replicas": 1},
]
ROLE = {"prefill": Role.PREFILL, "decode": Role.DECODE, "both": Role.BOTH}
# small values so that ties (equal loads, equal free blocks, equal queues) are common
LOAD = st.integers(0, 3)
FREE = st.integers(0, 40)
QUEUED = st.sampled_from([0, 0, 0, 100, 100, 2000])


def _fleet(unhealthy: set[int]) -> list[WorkerSnapshot]:
    out = []
    for p in POOLS:
        for r in range(p["replicas"]):
            i = len(out)
            out.append(WorkerSnapshot(f"{p['name']}-{r}", p["name"], ROLE[p["role"]], p["hardware"], i not in unhealthy,
                                      free_kv_blocks=40, total_kv_blocks=40, block_size=16))
    return sorted(out, key=lambda w: w.worker_id)


change = st.tuples(st.integers(0, 11), QUEUED, LOAD, LOAD, FREE)


def _apply(ws: tuple[WorkerSnapshot, ...], log: SnapshotChanges, changes: list[tuple[int, int, int, int, int]]) -> None:
    for i, q, run, wait, free in changes:
        f = ws[i].__dict__  # in place, as the simulator's bridge does
        f["queued_prefill_tokens"], f["running_batch"], f["waiting"], f["free_kv_blocks"] = q, run, wait, free
        log.record(i)


def _fresh(snap: ClusterSnapshot) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(dataclasses.replace(w) for w in snap.workers), snap.time_s)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 11), max_size=3), st.lists(st.lists(change, max_size=5), min_size=1, max_size=12),
       st.integers(1, 700), st.integers(1, 200), st.sampled_from([4096, 3]))
def test_index_answers_equal_the_scans(unhealthy, batches, prompt, max_tokens, keep):
    config = make_config(pools=POOLS)
    cm = cost_model()
    router = Router(config, cm)
    est, power = router.estimator, router.power
    log = SnapshotChanges(keep=keep)  # keep=3: the log is trimmed often, the index rebuilds
    snap = ClusterSnapshot(tuple(_fleet(unhealthy)), 0.0, changes=log)
    idx = FleetIndex(est, power)
    plain_power = PowerAccountant(cm)
    r = req(prompt, max_tokens)
    for batch in batches:
        _apply(snap.workers, log, batch)
        assert idx.sync(snap)
        assert idx.first_decode(r.kv_tokens) is DecodeOrder(r, snap.decode_view()).first
        for d in snap.decode_view():
            assert idx.local_s(d, prompt) == est.local_s(d, prompt)
        for best in (1e9, 0.0, 150.0):
            assert idx.remote_scan(prompt, best) == est.remote_scan(r, snap.prefill_view(), best)
        total = plain_power.cluster_total_w(snap)
        assert idx.total_w() == total
        for p in [None, *snap.prefill_view()]:
            for d in snap.decode_view():
                want = plain_power.after_w(total, p, d)
                assert idx.after_w(total, None if p is None else p.worker_id, d.worker_id) == want
        # the router on the logged snapshot decides as a router on a fresh copy (no log: it scans),
        # with and without admission's evaluation (with it: first_from_scan, the simulator's path)
        want_d = Router(config, cm).route(r, _fresh(snap))
        got = router.route(r, snap)
        assert got == want_d and got.predicted_power_w == want_d.predicted_power_w
        adm = Admission(config, router)
        if adm.decide(r, snap, QueueView()).action is AdmissionAction.ADMIT:
            got = router.route(r, snap, adm.last_evaluation)
            assert got == want_d and got.predicted_power_w == want_d.predicted_power_w
            assert got.predicted_ttft_ms == want_d.predicted_ttft_ms


def test_without_a_log_the_index_declines():
    config = make_config(pools=POOLS)
    router = Router(config, cost_model())
    snap = ClusterSnapshot(tuple(_fleet(set())), 0.0)
    assert snap.changes is None and not router.index.sync(snap)


@pytest.mark.parametrize("readings", [[500.5, None], [None, 300.25], [7, None]])
def test_metered_and_fractional_watts_fall_back_to_the_ordered_sum(readings):
    config = make_config(pools=POOLS)
    cm = cost_model()
    router = Router(config, cm)
    log = SnapshotChanges()
    snap = ClusterSnapshot(tuple(_fleet(set())), 0.0, changes=log)
    idx = router.index
    plain = PowerAccountant(cm)
    assert idx.sync(snap) and idx.total_w() == plain.cluster_total_w(snap)
    for i, reading in enumerate(readings * 3):  # a meter appears, changes, goes away again
        w = snap.workers[i % len(snap.workers)]
        w.__dict__["power_w"] = reading
        w.__dict__["running_batch"] = i % 2
        log.record(i % len(snap.workers))
        assert idx.sync(snap)
        assert idx.total_w() == plain.cluster_total_w(snap)
    for i, w in enumerate(snap.workers):
        w.__dict__["power_w"] = None
        log.record(i)
    assert idx.sync(snap) and idx.total_w() == plain.cluster_total_w(snap)


def test_log_since_and_trim():
    log = SnapshotChanges(keep=2)
    assert log.position == 0 and log.since(0) == []
    for i in (5, 6, 7, 8):
        log.record(i)
    assert log.since(0) == [5, 6, 7, 8] and log.since(3) == [8]
    log.record(9)  # 2·keep entries: the oldest keep are dropped, positions before 2 are gone
    assert log.position == 5 and log.since(2) == [7, 8, 9] and log.since(1) is None

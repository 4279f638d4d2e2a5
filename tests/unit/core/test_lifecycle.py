"""Request lifecycle: legal edges only, owners and deadlines on KV states, leases that expire."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.lifecycle import (
    KV_HOLDING,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    LeaseError,
    LifecycleTable,
    RequestLifecycle,
    RequestState,
)
from orchestrator.core.ports import SimClock

S = RequestState


def test_remote_prefill_story_with_owners_timestamps_and_release():
    clock = SimClock(100.0)
    lc = RequestLifecycle("r1", clock, lease_s=5.0)
    assert lc.advance(S.ADMITTED) == []
    clock.advance(0.5)
    lc.advance(S.ROUTED, note="remote_faster")
    lc.advance(S.KV_RESERVED, hold={"d0": 8})
    assert lc.owners == ("d0",) and lc.leases[0].deadline_s == pytest.approx(105.5)
    clock.advance(1.0)
    lc.advance(S.PREFILLING, hold={"p0": 8})
    assert lc.owners == ("d0", "p0")
    lc.advance(S.TRANSFERRING)
    clock.advance(0.25)
    freed = lc.advance(S.DECODING, release=["p0"])  # decode acknowledged: prefill frees its copy
    assert [(f.worker_id, f.num_blocks) for f in freed] == [("p0", 8)]
    lc.renew("d0")
    assert lc.leases[0].deadline_s == pytest.approx(106.75)
    clock.advance(2.0)
    freed = lc.advance(S.FINISHED)
    assert [(f.worker_id, f.num_blocks) for f in freed] == [("d0", 8)] and lc.leases == ()
    assert [s for s, _, _ in lc.history] == [
        S.RECEIVED, S.ADMITTED, S.ROUTED, S.KV_RESERVED, S.PREFILLING, S.TRANSFERRING, S.DECODING, S.FINISHED
    ]
    assert lc.entered_s(S.ROUTED) == 100.5 and lc.entered_s(S.FINISHED) == pytest.approx(103.75)
    assert lc.history[2][2] == "remote_faster"


def test_local_prefill_story():
    lc = RequestLifecycle("r2", SimClock())
    lc.advance(S.ADMITTED)
    lc.advance(S.ROUTED)
    lc.advance(S.PREFILLING, hold={"d0": 3})
    lc.advance(S.DECODING)
    assert lc.owners == ("d0",)
    assert [f.num_blocks for f in lc.advance(S.CANCELLED)] == [3]


ILLEGAL = [(a, b) for a, b in itertools.product(S, S) if b not in TRANSITIONS[a]]


@pytest.mark.parametrize("src, dst", ILLEGAL, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL])
def test_every_illegal_edge_raises(src, dst):
    lc = RequestLifecycle("r", SimClock())
    lc.state = src  # put it there directly: only the edge under test is exercised
    with pytest.raises(IllegalTransition) as ei:
        lc.advance(dst, hold={"w": 1})
    assert src.value in str(ei.value) and dst.value in str(ei.value)
    assert lc.state is src


def test_terminal_states_have_no_way_out_and_the_table_is_complete():
    assert set(TRANSITIONS) == set(S)
    for t in TERMINAL:
        assert TRANSITIONS[t] == frozenset()
    for s in set(S) - TERMINAL:
        assert {S.CANCELLED, S.FAILED} <= TRANSITIONS[s]


def test_kv_states_need_an_owner_and_kv_free_states_hold_none():
    lc = RequestLifecycle("r", SimClock())
    lc.advance(S.ADMITTED)
    lc.advance(S.ROUTED)
    with pytest.raises(LeaseError, match="needs an owner"):
        lc.advance(S.KV_RESERVED)
    assert lc.state is S.ROUTED
    with pytest.raises(LeaseError, match="holds no lease"):
        lc.advance(S.KV_RESERVED, release=["d9"])
    with pytest.raises(LeaseError):
        lc.renew("d0")
    lc.advance(S.KV_RESERVED, hold={"d0": 2})
    with pytest.raises(LeaseError, match="needs an owner"):
        lc.advance(S.PREFILLING, release=["d0"])


def test_lease_expiry_fails_the_request_and_frees_every_block():
    clock = SimClock()
    table = LifecycleTable(clock, lease_s=2.0)
    a, b = table.start("a"), table.start("b")
    for lc, w in ((a, "d0"), (b, "d1")):
        lc.advance(S.ADMITTED)
        lc.advance(S.ROUTED)
        lc.advance(S.KV_RESERVED, hold={w: 4})
    b.advance(S.PREFILLING, hold={"p0": 4})
    assert table.held_blocks() == 12 and table.held_blocks("d0") == 4
    clock.advance(1.5)
    b.renew("d1")
    b.renew("p0")
    clock.advance(1.0)  # a's lease (deadline 2.0) is past, b's (3.5) is not
    freed = table.sweep()
    assert [(f.request_id, f.worker_id) for f in freed] == [("a", "d0")]
    assert a.state is S.FAILED and "lease expired" in a.history[-1][2] and b.state is S.PREFILLING
    clock.advance(5.0)
    assert sorted((f.request_id, f.worker_id, f.num_blocks) for f in table.sweep()) == [
        ("b", "d1", 4), ("b", "p0", 4)
    ]
    assert table.held_blocks() == 0
    assert [lc.request_id for lc in table.forget_terminal()] == ["a", "b"] and len(table) == 0
    table.start("x")
    with pytest.raises(LeaseError, match="already live"):
        table.start("x")


def test_clock_never_goes_backwards():
    c = SimClock(1.0)
    with pytest.raises(ValueError):
        c.advance(-0.1)
    with pytest.raises(ValueError):
        c.set(0.5)
    c.set(2.0)
    assert c.now_s() == 2.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3), st.booleans()), max_size=25))
def test_random_walks_keep_the_invariants(steps):
    """Any walk over legal edges: KV states always owned, terminal states own nothing, no block lost."""
    clock = SimClock()
    lc = RequestLifecycle("r", clock, lease_s=1.0)
    held = 0
    for pick, worker, release in steps:
        nexts = sorted(TRANSITIONS[lc.state], key=lambda s: s.value)
        if not nexts:
            break
        dst = nexts[pick % len(nexts)]
        hold = {f"w{worker}": 2} if dst in KV_HOLDING else None
        rel = [lc.owners[0]] if release and lc.owners and dst in KV_HOLDING else []
        if dst not in KV_HOLDING and not dst.terminal and lc.owners:
            rel = list(lc.owners)
        freed = lc.advance(dst, hold=hold, release=rel)
        held += 2 * bool(hold) - sum(f.num_blocks for f in freed)
        clock.advance(0.1)
        assert held == sum(x.num_blocks for x in lc.leases)
        assert bool(lc.leases) == (lc.state in KV_HOLDING)
    assert lc.state.terminal or held == sum(x.num_blocks for x in lc.leases)

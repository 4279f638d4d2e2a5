"""The small port implementations in core/ports.py behave as their protocols say."""

from __future__ import annotations

import pytest

from orchestrator.core.ports import (
    Clock,
    FakeEngine,
    InProcessKVTransport,
    KVBlocksExhausted,
    SimClock,
    StaticPowerMeter,
    WallClock,
)


def test_clocks():
    wall = WallClock()
    a = wall.now_s()
    assert wall.now_s() >= a
    assert isinstance(wall, Clock) and isinstance(SimClock(), Clock)
    sim = SimClock(5.0)
    assert sim.advance(2.5) == 7.5 and sim.now_s() == 7.5


def test_fake_engine_block_accounting():
    e = FakeEngine(10)
    e.reserve("a", 4)
    e.reserve("a", 2)
    e.reserve("b", 4)
    assert e.free_kv_blocks == 0
    with pytest.raises(KVBlocksExhausted, match="wants 1 blocks, 0 free"):
        e.reserve("c", 1)
    assert e.free("a") == 6 and e.free("a") == 0 and e.free_kv_blocks == 6
    assert e.free("b") == 4 and e.free_kv_blocks == e.total_kv_blocks == 10


def test_static_meter_and_inprocess_transport():
    m = StaticPowerMeter({"d0": 310.0})
    assert m.read_w("d0") == 310.0 and m.read_w("d1") is None
    t = InProcessKVTransport({"r1": 4096})
    assert t.send("r1", "p0", "d0") == 4096 and t.send("r2", "p0", "d0") == 0
    assert t.moved == [("r1", "p0", "d0", 4096), ("r2", "p0", "d0", 0)]

"""The event loop's ordering rules and the fleet power integrator."""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.sim.events import EventLoop, SimulationError
from orchestrator.sim.fleet import FleetPower, percentile


def test_events_run_in_time_then_schedule_order_and_handlers_return_events():
    loop = EventLoop()
    seen = []

    def h(tag):
        seen.append((loop.now_s, tag))
        if tag == "a":
            return [(2.0, h, "c"), (1.5, h, "b")]
        if tag == "b":
            return (1.5, h, "b2")  # same instant: runs after everything already at 1.5
        return None

    loop.schedule(1.0, h, "a")
    loop.schedule(1.5, h, "x")
    end = loop.run()
    assert seen == [(1.0, "a"), (1.5, "x"), (1.5, "b"), (1.5, "b2"), (2.0, "c")]
    assert end == 2.0 and loop.events_run == 5 and len(loop) == 0


def test_run_until_stops_before_later_events():
    loop = EventLoop()
    loop.schedule(1.0, lambda _: None)
    loop.schedule(5.0, lambda _: None)
    assert loop.run(until_s=2.0) == 1.0
    assert len(loop) == 1


def test_scheduling_into_the_past_is_an_error():
    loop = EventLoop()
    loop.schedule(1.0, lambda _: (0.5, lambda _: None, None))
    with pytest.raises(SimulationError, match="< now"):
        loop.run()
    loop2 = EventLoop()
    loop2.now_s = 3.0
    with pytest.raises(SimulationError, match="before now"):
        loop2.schedule(2.0, lambda _: None)


def test_fleet_power_energy_equals_integral_of_timeline_and_buckets():
    rng = random.Random(3)
    fp = FleetPower(bucket_s=0.7, record_timeline=True)
    fp.start(0.0, 100.0)
    t = 0.0
    for _ in range(2000):
        t += rng.expovariate(5.0)
        fp.change(t, rng.choice([-1, 1]) * rng.uniform(0, 50) if fp.power_w > 60 else 40.0)
    end = t + 0.3
    fp.advance(end)
    tl = fp.timeline
    integral = math.fsum(p * (t1 - t0) for (t0, p), (t1, _) in zip(tl, tl[1:] + [(end, 0.0)], strict=True))
    assert fp.energy_j == pytest.approx(integral, rel=1e-12)
    assert math.fsum(fp.buckets_j) == pytest.approx(integral, rel=1e-12)
    assert fp.peak_w == max(p for _, p in tl)
    # one bucket by hand: the energy in [0.7, 1.4)
    lo, hi = 0.7, 1.4
    by_hand = 0.0
    for (t0, p), (t1, _) in zip(tl, tl[1:] + [(end, 0.0)], strict=True):
        by_hand += p * max(0.0, min(t1, hi) - max(t0, lo))
    assert fp.buckets_j[1] == pytest.approx(by_hand, rel=1e-12)


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    vals = sorted(random.Random(0).random() for _ in range(10001))
    assert percentile(vals, 90) == vals[9000]

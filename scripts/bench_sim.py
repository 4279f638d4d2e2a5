"""Benchmark: how fast the simulator runs a large workload through the core's router.

    .venv/bin/python scripts/bench_sim.py [--requests 1000000] [--rate 150] [--out bench_sim.json]
    .venv/bin/python scripts/bench_sim.py --requests 100000 --digest   # the outcome check, not a timing
    .venv/bin/python scripts/bench_sim.py --compiled ...   # the mypyc build of `make sim-compiled`

Simulates `--requests` requests of `cluster_configs/sim/workloads/chat-poisson.yaml` (at `--rate`)
on the 32-worker heterogeneous fleet `cluster_configs/sim/serving/bench-32-heterogeneous.yaml`,
prints a table (wall and CPU time, requests/s, events/s, the share of wall time spent inside the
core's admission + router) and writes the same as JSON with the device, date and versions.

`--digest` instead runs with every decision and power change recorded and prints SHA-256 digests of
the full JSON report (every percentile, decisions by reason, energy, per-pool figures, the sorted
TTFT/TPOT series, power over time; the `events` count left out: it depends on how decode steps are
grouped into events, not on the outcome), of the decision log (request, decode, prefill, reason),
of the finish order and of the fleet power timeline. A speed change must leave them identical.

`--compiled` (or TANDEM_SIM_COMPILED=1) runs the hot modules compiled by `make sim-compiled`
(orchestrator/sim/compiled.py) when the build matches the sources, else pure Python with a warning;
the table, the JSON and the digest output say which ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.sim import compiled  # noqa: E402  (imports none of the compiled modules)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compiled", action="store_true",
                    help=f"use the mypyc build (`make sim-compiled`; or {compiled.ENV_VAR}=1); pure Python if stale")
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=150.0, help="arrival rate (req/s)")
    ap.add_argument("--config", default=str(ROOT / "cluster_configs/sim/serving/bench-32-heterogeneous.yaml"))
    ap.add_argument("--workload", default=str(ROOT / "cluster_configs/sim/workloads/chat-poisson.yaml"))
    ap.add_argument("--out", default="bench_sim.json")
    ap.add_argument("--digest", action="store_true", help="print outcome digests (see above) instead of timing")
    args = ap.parse_args()
    if compiled.requested(args.compiled):
        compiled.enable()  # before the first import of a compiled module (warns and runs pure if stale)
    if args.digest:
        return digest(args)

    from orchestrator.config.loader import load_config
    from orchestrator.sim.build import build_simulation
    from orchestrator.sim.workload import load_workload

    config = load_config(args.config)
    workload = load_workload(args.workload).with_rate(args.rate)
    t0 = time.perf_counter()
    sim = build_simulation(config)
    build_s = time.perf_counter() - t0

    # time spent in the core's decisions (admission + router), measured around the bridge's calls
    # (by a stand-in that forwards to it: a compiled bridge's methods cannot be replaced)
    bridge = sim.decisions
    spent = [0.0]

    class TimedBridge:
        def __init__(self) -> None:
            self.mark = bridge.mark
            self.abandon = bridge.abandon

        @property
        def queued(self) -> int:
            return bridge.queued

        def offer(self, req, now_s):
            t = time.perf_counter()
            try:
                return bridge.offer(req, now_s)
            finally:
                spent[0] += time.perf_counter() - t

        def drain(self, now_s):
            t = time.perf_counter()
            try:
                return bridge.drain(now_s)
            finally:
                spent[0] += time.perf_counter() - t

    sim.decisions = TimedBridge()
    load_before = os.getloadavg()[0]  # the box is shared: its load moves CPU seconds by up to ~1.5x
    t0 = time.perf_counter()
    c0 = time.process_time()
    report = sim.run(workload.requests(args.requests))
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    leaks = sim.leak_report()
    n_workers = len(sim.workers)
    row = {
        "requests": report.requests,
        "finished": report.finished,
        "rejected": report.rejected,
        "workers": n_workers,
        "rate_rps": args.rate,
        "simulated_s": round(report.duration_s, 1),
        "events": report.events,
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),  # < wall_s when other processes share the cores
        "requests_per_cpu_s": round(report.requests / cpu_s, 1),
        "build_s": round(build_s, 3),
        "requests_per_s": round(report.requests / wall_s, 1),
        "events_per_s": round(report.events / wall_s, 1),
        "core_decisions_s": round(spent[0], 2),
        "core_decisions_share": round(spent[0] / wall_s, 3),
        "us_per_request_core": round(spent[0] / max(1, report.requests) * 1e6, 1),
        "us_per_request_sim": round((wall_s - spent[0]) / max(1, report.requests) * 1e6, 1),
        "ttft_p99_ms": round(report.ttft_ms["p99"], 1),
        "tpot_p99_ms": round(report.tpot_ms["p99"], 2),
        "decisions": report.decisions,
        "leaks": leaks,
    }
    print(f"{'compiled':<24}{str(compiled.status().compiled):>16}   ({compiled.status().detail})")
    print(f"{'metric':<24}{'value':>16}")
    for k, v in row.items():
        if not isinstance(v, dict | list):
            print(f"{k:<24}{v:>16}")
    print(f"{'decisions':<24}{json.dumps(report.decisions)}")
    import pydantic

    meta = {
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU only)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "pydantic": pydantic.__version__,
        "config": os.path.relpath(args.config, ROOT),
        "workload": os.path.relpath(args.workload, ROOT),
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "compiled": compiled.status().compiled,  # the mypyc build ran (orchestrator/sim/compiled.py)
        "compiled_modules": len(compiled.loaded_compiled()),
        "compiled_status": f"{compiled.status().state.value}: {compiled.status().detail}",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "result": row}, indent=2))
    print(f"wrote {args.out}")
    return 0 if not leaks else 1


def digest(args: argparse.Namespace) -> int:
    import hashlib

    from orchestrator.config.loader import load_config
    from orchestrator.sim.build import SimOptions, build_simulation
    from orchestrator.sim.workload import load_workload

    def sha(x: object) -> str:
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]

    sim = build_simulation(load_config(args.config), options=SimOptions(record_decisions=True, record_timeline=True))
    sim.recorder.track_ids()
    report = sim.run(load_workload(args.workload).with_rate(args.rate).requests(args.requests))
    full = report.to_dict(include_series=True)
    events = full.pop("events")
    out = {
        "requests": report.requests,
        "events": events,
        "report": sha(full),
        "decision_log": sha(sim.decision_log),
        "finished_ids": sha(list(sim.recorder.finished_ids or [])),
        "power_timeline": sha(sim.fleet_power.timeline),
        "energy_j": report.energy_j,
        "ttft_ms": report.ttft_ms,
        "decisions": report.decisions,
        "leaks": sim.leak_report(),
        "compiled": compiled.status().compiled,
        "compiled_modules": len(compiled.loaded_compiled()),
    }
    print(json.dumps(out, indent=1))
    return 0 if not out["leaks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

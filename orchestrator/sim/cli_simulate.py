"""`tandem simulate --config SERVING.yaml --workload WORKLOAD [--requests N] [--json] [--plot DIR]`.

Loads the serving config (the same file `tandem serve` takes) and a workload (a YAML under
`cluster_configs/sim/workloads/` or a bare trace file), runs the simulator with the core's
router and admission, and prints a table (or the report as JSON with --json). Exit status 0 on a
completed run, 2 on bad input (the message names the file and the problem).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.core.types import TandemError

DEFAULT_REQUESTS = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="serving YAML (pools, routing, SLA classes, power)")
    parser.add_argument("--workload", required=True,
                        help="workload YAML or trace file (.csv Azure/BurstGPT, .jsonl Mooncake, .json ShareGPT)")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests to simulate (default: whole trace, or {DEFAULT_REQUESTS:,} for synthetic)")
    parser.add_argument("--rate", type=float, default=None, help="override the arrival rate (req/s)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="prefill batch token budget")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write TTFT/TPOT CDFs and power over time here")
    parser.add_argument("--progress", action="store_true", help="show a progress bar even when not on a TTY")
    parser.add_argument("--compiled", action="store_true",
                        help="run the mypyc build of the hot modules (`make sim-compiled`; or TANDEM_SIM_COMPILED=1); "
                             "pure Python, with a warning, when it is missing or stale")


def run(args: argparse.Namespace) -> int:
    from orchestrator.sim import compiled

    if compiled.requested(args.compiled):
        compiled.enable()  # before the first import of a compiled module

    from orchestrator.config.loader import load_config
    from orchestrator.sim.build import SimOptions, build_simulation
    from orchestrator.sim.render import plot_report, print_report, progress_bar
    from orchestrator.sim.workload import load_workload

    try:
        config = load_config(args.config)
        workload = load_workload(args.workload)
        if args.rate is not None:
            if not args.rate > 0:
                raise TandemError(f"--rate must be > 0, got {args.rate}")
            workload = workload.with_rate(args.rate)
        n = args.requests if args.requests is not None else (None if workload.is_trace else DEFAULT_REQUESTS)
        if n is not None and n < 1:
            raise TandemError(f"--requests must be >= 1, got {n}")
        opts = SimOptions() if args.max_batch_tokens is None else SimOptions(max_batch_tokens=args.max_batch_tokens)
        sim = build_simulation(config, options=opts)
        show = (args.progress or sys.stderr.isatty()) and not args.json
        with progress_bar(n, show) as update:
            report = sim.run(workload.requests(n), progress=update)
    except TandemError as e:
        print(f"tandem simulate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, title=f"{workload.name} on {Path(args.config).name}")
    if args.plot:
        sla = config.sla_class(None)
        paths = plot_report(report, args.plot, (sla.ttft_ms, sla.tpot_ms))
        if not args.json:
            print("plots: " + ", ".join(str(p) for p in paths))
    return 0

"""`tandem plan --workload W --sla ttft_ms=…,tpot_ms=… --rate R [--power-budget-w W]
[--hardware h100,gaudi2,l4] [--json] [--plot DIR]`.

Searches pool sizes, hardware mixes, the local-prefill threshold and FP8 vs bf16 for the cheapest
(`--objective cost`) or lowest-power (`--objective power`) fleet that meets the SLA at the rate
within the budget (see `orchestrator.sim.planner`). Prints the ranked table and the Pareto
frontier, and writes `plan-serving.yaml` and `plan-ray.yaml` into `--out` (default: the current
folder). Exit 0 with a verified plan, 1 when no screened candidate passed simulation, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.core.types import LinearMode, TandemError

ALIASES = {"h100": "h100-sxm", "h100-sxm5": "h100-sxm", "gaudi-2": "gaudi2", "gaudi-3": "gaudi3"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, help="workload YAML or trace file")
    parser.add_argument("--sla", required=True, help="targets, e.g. ttft_ms=1000,tpot_ms=100,percentile=99")
    parser.add_argument("--rate", type=float, required=True, help="arrival rate to plan for (req/s)")
    parser.add_argument("--power-budget-w", type=float, default=None, help="cluster power budget (W)")
    parser.add_argument("--hardware", default="h100,gaudi2,l4", help="catalog keys to mix (aliases: h100)")
    parser.add_argument("--model", default="llama-3.1-8b-shape", help="model shape preset")
    parser.add_argument("--objective", choices=("cost", "power"), default="cost")
    parser.add_argument("--modes", default="fp8-dynamic,bf16", help="linear modes to consider")
    parser.add_argument("--thresholds", default="0,1024,4096",
                        help="local-prefill thresholds to consider (prompt tokens at or above go remote)")
    parser.add_argument("--max-replicas", type=int, default=64, help="largest pool considered")
    parser.add_argument("--verify-top", type=int, default=3, help="candidate layouts to simulate")
    parser.add_argument("--verify-requests", type=int, default=3000, help="requests per verification run")
    parser.add_argument("--out", default=".", help="folder for plan-serving.yaml and plan-ray.yaml")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write pareto.png here")
    parser.add_argument("--compiled", action="store_true",
                        help="run the mypyc build of the hot modules (`make sim-compiled`; or TANDEM_SIM_COMPILED=1); "
                             "pure Python, with a warning, when it is missing or stale")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TandemError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise TandemError(f"--{what}: expected integers >= 0, got {text!r}")
    return vals


def run(args: argparse.Namespace) -> int:
    from orchestrator.sim import compiled

    if compiled.requested(args.compiled):
        compiled.enable()  # before the first import of a compiled module

    from orchestrator.sim.plan_output import (
        candidate_row,
        plot_plan,
        print_plan,
        write_ray_yaml,
        write_serving_yaml,
    )
    from orchestrator.sim.planner import PlanQuestion, SLATarget, plan
    from orchestrator.sim.workload import load_workload

    try:
        hardware = tuple(ALIASES.get(h.strip().lower(), h.strip().lower()) for h in args.hardware.split(",") if h.strip())
        try:
            modes = tuple(LinearMode(m.strip()) for m in args.modes.split(",") if m.strip())
        except ValueError:
            raise TandemError(f"--modes: expected values of {[m.value for m in LinearMode]}, got {args.modes!r}") from None
        if args.max_replicas < 1 or args.verify_top < 1 or args.verify_requests < 1:
            raise TandemError("--max-replicas, --verify-top and --verify-requests must be >= 1")
        if args.power_budget_w is not None and not args.power_budget_w > 0:
            raise TandemError(f"--power-budget-w must be > 0, got {args.power_budget_w}")
        q = PlanQuestion(
            workload=load_workload(args.workload), sla=SLATarget.parse(args.sla), rate_rps=args.rate,
            hardware=hardware, model_shape=args.model, power_budget_w=args.power_budget_w,
            objective=args.objective, thresholds=_ints(args.thresholds, "thresholds"), modes=modes,
            max_replicas=args.max_replicas, verify_top=args.verify_top, verify_requests=args.verify_requests,
        )
        planner, result = plan(q)
    except TandemError as e:
        print(f"tandem plan: {e}", file=sys.stderr)
        return 2
    chosen = result.chosen
    written = []
    if chosen is not None:
        out = Path(args.out)
        written = [write_serving_yaml(planner, chosen, out / "plan-serving.yaml"),
                   write_ray_yaml(planner, chosen, out / "plan-ray.yaml")]
    if args.plot:
        written.append(plot_plan(result, Path(args.plot) / "pareto.png"))
    if args.json:
        print(json.dumps({
            "chosen": candidate_row(chosen) if chosen else None,
            "verified": [candidate_row(c) for c in result.verified],
            "frontier": [candidate_row(c) for c in result.frontier],
            "screened": len(result.screened),
            "files": [str(p) for p in written],
        }, indent=2, default=str))
    else:
        print_plan(result)
        if chosen is None:
            print("no screened candidate met the SLA in simulation; try --verify-top higher or relax the SLA")
        else:
            print(f"chosen: {chosen.label} (${chosen.cost_per_hour_usd:.2f}/h)")
        for p in written:
            print(f"wrote {p}")
    return 0 if chosen is not None else 1

"""What `tandem plan` writes: the chosen serving YAML, a `ray up` YAML, a ranked table, a plot.

The serving YAML is the planner's `serving_dict` dumped as YAML with a header saying how it was
chosen; `load_config` reads it back (a test checks). The `ray up` YAML declares one node type per
pool, sized to the pool's replicas, tagged with a custom resource named after the hardware key
(the serving YAML's `placement.resources` asks for the same tag), on an on-prem (`local`)
provider: fill in the addresses of your machines before `ray up`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.sim.planner import Candidate, Planner, PlanResult


def _header(planner: Planner, c: Candidate) -> str:
    q = planner.q
    lines = [
        "Written by `tandem plan`.",
        f"Question: {q.workload.name} at {q.rate_rps:g} req/s, TTFT p{q.sla.percentile:g} <= {q.sla.ttft_ms:g} ms, "
        f"TPOT p{q.sla.percentile:g} <= {q.sla.tpot_ms:g} ms"
        + (f", power budget {q.power_budget_w:g} W" if q.power_budget_w is not None else "") + ".",
        f"Answer: {c.label}, ${c.cost_per_hour_usd:.2f}/h, ~{c.avg_power_w:,.0f} W average (analytic).",
    ]
    if c.sim:
        lines.append(f"Simulated ({c.sim['requests']} requests): TTFT p{q.sla.percentile:g} {c.sim['ttft_ms_q']:.0f} ms, "
                     f"TPOT p{q.sla.percentile:g} {c.sim['tpot_ms_q']:.1f} ms, {c.sim['avg_power_w']:,.0f} W average.")
    return "".join(f"# {line}\n" for line in lines)


def write_serving_yaml(planner: Planner, c: Candidate, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(planner.serving_dict(c), sort_keys=False, default_flow_style=False)
    path.write_text(_header(planner, c) + body)
    return path


def ray_up_yaml(planner: Planner, c: Candidate, cluster_name: str = "tandem-plan") -> str:
    """A `ray up` cluster YAML for the candidate (on-prem provider), every key commented."""
    pools = [(p["name"], p["hardware"], p["replicas"], p["placement"]) for p in planner.serving_dict(c)["pools"]]
    total = sum(n for _, _, n, _ in pools)
    out = [
        _header(planner, c).rstrip("\n"),
        "# Ray cluster launcher file: `ray up <this file>`. One worker node per accelerator replica.",
        f"cluster_name: {cluster_name}  # names the cluster in `ray attach`, `ray down`",
        f"max_workers: {total}  # upper bound over all worker node types (= the plan's replicas)",
        "upscaling_speed: 1.0  # how fast the autoscaler adds nodes (1.0 = up to 100% more per round)",
        "idle_timeout_minutes: 30  # a worker idle this long is removed (down to min_workers)",
        "provider:",
        "  type: local  # on-prem: Ray ssh-es into the machines listed below",
        "  head_ip: HEAD_NODE_ADDRESS  # fill in: the machine that runs the Tandem frontend and router",
        "  worker_ips: []  # fill in: one address per accelerator machine (or use node types below)",
        "auth:",
        "  ssh_user: ubuntu  # account Ray logs in as on every node",
        "available_node_types:",
        "  head:",
        "    resources: {CPU: 8}  # the control plane needs no accelerator",
        "    node_config: {}  # provider-specific; empty for on-prem",
        "    min_workers: 0",
        "    max_workers: 0",
    ]
    for name, hw, n, placement in pools:
        accel = "GPU: 1" if placement["num_gpus"] else "HPU: 1"
        out += [
            f"  {name}_{hw.replace('-', '_')}:  # the {name} pool",
            f"    resources: {{CPU: 8, {accel}, {hw}: 1}}  # `{hw}` = placement.resources in the serving YAML",
            "    node_config: {}",
            f"    min_workers: {n}  # the plan's replicas, kept up",
            f"    max_workers: {n}",
        ]
    out += [
        "head_node_type: head  # which node type above is the head",
        "setup_commands:  # run on every node after it starts",
        "  - pip install tandem  # the package; pin the version you tested",
        "head_start_ray_commands:",
        "  - ray stop",
        "  - ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml",
        "worker_start_ray_commands:",
        "  - ray stop",
        "  - ray start --address=$RAY_HEAD_IP:6379",
    ]
    return "\n".join(out) + "\n"


def write_ray_yaml(planner: Planner, c: Candidate, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ray_up_yaml(planner, c))
    return path


def candidate_row(c: Candidate) -> dict[str, Any]:
    return {
        "fleet": c.label, "prefill_hw": c.prefill_hw, "decode_hw": c.decode_hw, "linear_mode": c.linear_mode.value,
        "threshold_tokens": c.threshold_tokens, "n_prefill": c.n_prefill, "n_decode": c.n_decode,
        "cost_per_hour_usd": round(c.cost_per_hour_usd, 3), "avg_power_w": round(c.avg_power_w, 1),
        "peak_power_w": round(c.peak_power_w, 1), "pred_ttft_ms_q": round(c.pred_ttft_ms, 2),
        "pred_tpot_ms": round(c.pred_tpot_ms, 3), "verified": c.verified, "sim": c.sim,
    }


def print_plan(result: PlanResult, file: Any = None, top: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    q = result.question
    pct = f"p{q.sla.percentile:g}"
    console = Console(file=file or sys.stdout, width=140)
    t = Table(title=f"verified by simulation ({q.verify_requests:,} requests each), best first")
    for col in ("#", "fleet", "$/h", "avg W", f"TTFT {pct} ms", f"TPOT {pct} ms", "SLA met", "verdict"):
        t.add_column(col, justify="left" if col == "fleet" else "right")
    for i, c in enumerate(result.verified, 1):
        s = c.sim
        t.add_row(str(i), c.label, f"{c.cost_per_hour_usd:.2f}", f"{s['avg_power_w']:,.0f}", f"{s['ttft_ms_q']:,.0f}",
                  f"{s['tpot_ms_q']:.1f}", f"{s['sla_attainment']:.1%}", "meets SLA" if c.verified else "misses")
    console.print(t)
    s = Table(title=f"analytic screen: {len(result.screened):,} feasible candidates (top {top})")
    for col in ("#", "fleet", "$/h", "avg W", f"pred TTFT {pct} ms", "pred TPOT ms", "prefill util", "decode batch"):
        s.add_column(col, justify="left" if col == "fleet" else "right")
    for i, c in enumerate(result.screened[:top], 1):
        s.add_row(str(i), c.label, f"{c.cost_per_hour_usd:.2f}", f"{c.avg_power_w:,.0f}", f"{c.pred_ttft_ms:,.0f}",
                  f"{c.pred_tpot_ms:.1f}", f"{c.prefill_util:.0%}", f"{c.decode_batch:.1f}")
    console.print(s)
    f = Table(title="Pareto frontier (cost vs average power)")
    for col in ("fleet", "$/h", "avg W"):
        f.add_column(col, justify="left" if col == "fleet" else "right")
    for c in result.frontier:
        f.add_row(c.label, f"{c.cost_per_hour_usd:.2f}", f"{c.avg_power_w:,.0f}")
    console.print(f)


def plot_plan(result: PlanResult, path: Path) -> Path:
    """Scatter of screened candidates (cost vs power), the Pareto frontier, verified points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    xs = [c.cost_per_hour_usd for c in result.screened]
    ys = [c.avg_power_w / 1e3 for c in result.screened]
    ax.scatter(xs, ys, s=8, color="lightgray", label="screened (analytic)")
    fr = result.frontier
    ax.plot([c.cost_per_hour_usd for c in fr], [c.avg_power_w / 1e3 for c in fr], "o-", color="tab:blue",
            markersize=4, label="Pareto frontier")
    for c in result.verified:
        ax.scatter([c.cost_per_hour_usd], [c.sim["avg_power_w"] / 1e3], marker="*", s=90,
                   color="tab:green" if c.verified else "tab:red")
    chosen = result.chosen
    if chosen is not None:
        ax.annotate(chosen.label, (chosen.cost_per_hour_usd, chosen.sim["avg_power_w"] / 1e3), fontsize=7,
                    xytext=(8, 8), textcoords="offset points")
    ax.scatter([], [], marker="*", color="tab:green", label="simulated: meets SLA")
    ax.scatter([], [], marker="*", color="tab:red", label="simulated: misses")
    ax.set_xlabel("fleet cost ($/h, catalog prices)")
    ax.set_ylabel("average power (kW)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

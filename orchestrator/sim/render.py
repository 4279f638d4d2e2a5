"""Terminal tables, a progress bar and plots for simulation reports.

rich and matplotlib are imported lazily, inside the functions that draw: importing the simulator
never pulls them in. Plots use the Agg backend (files only, no display needed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.sim.report import SimReport


def _ms(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.1f}" if x < 10000 else f"{x:,.0f}"


def print_report(report: SimReport, title: str = "simulation", file: Any = None) -> None:
    """A rich table of the headline numbers, per-pool figures and decisions by reason."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=120)
    t = Table(title=title, show_header=True)
    t.add_column("metric")
    for q in ("p50", "p90", "p99", "mean"):
        t.add_column(q, justify="right")
    for name, dist in (("TTFT ms", report.ttft_ms), ("TPOT ms", report.tpot_ms), ("E2E ms", report.e2e_ms)):
        t.add_row(name, *(_ms(dist.get(q)) for q in ("p50", "p90", "p99", "mean")))
    console.print(t)
    s = Table(show_header=False, title="fleet")
    s.add_column("what")
    s.add_column("value", justify="right")
    rows = [
        ("requests (finished / rejected)", f"{report.requests:,} ({report.finished:,} / {report.rejected:,})"),
        ("simulated time", f"{report.duration_s:,.1f} s"),
        ("SLA attainment", f"{report.sla_attainment:.2%}" if report.requests else "-"),
        ("goodput", f"{report.goodput_rps:,.2f} req/s"),
        ("output tokens/s", f"{report.throughput_tokens_per_s:,.0f}"),
        ("energy per output token", f"{report.energy_per_token_j:.3f} J"),
        ("power avg / peak", f"{report.avg_power_w:,.0f} / {report.peak_power_w:,.0f} W"),
        ("queued by admission", f"{report.queued_by_admission:,}"),
    ]
    if report.rejections:
        rows.append(("rejections", ", ".join(f"{k} {v:,}" for k, v in sorted(report.rejections.items()))))
    for k, v in rows:
        s.add_row(k, v)
    console.print(s)
    p = Table(title="pools")
    for col in ("pool", "role", "hw", "n", "util", "prefill wait ms", "KV wait ms", "max queue", "energy kJ"):
        p.add_column(col, justify="right" if col not in ("pool", "role", "hw") else "left")
    for pr in report.pools:
        p.add_row(pr.pool, pr.role, pr.hardware, str(pr.replicas), f"{pr.utilization:.1%}",
                  _ms(pr.mean_prefill_wait_ms), _ms(pr.mean_kv_wait_ms), str(max(pr.max_prefill_queue, pr.max_kv_queue)),
                  f"{pr.energy_j / 1e3:,.1f}")
    console.print(p)
    d = Table(title="routing decisions by reason", min_width=40)
    d.add_column("reason")
    d.add_column("count", justify="right")
    for k, v in report.decisions.items():
        d.add_row(k, f"{v:,}")
    console.print(d)


@contextmanager
def progress_bar(total: int | None, enabled: bool) -> Iterator[Callable[[float, int], None] | None]:
    """A rich progress bar over arrived requests (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), transient=False) as prog:
        task = prog.add_task("", total=total)

        def update(now_s: float, arrived: int) -> None:
            prog.update(task, completed=arrived, description=f"t={now_s:,.0f}s")

        yield update
        prog.update(task, completed=total) if total else None


def _cdf_axes(ax: Any, series: Sequence[tuple[str, Sequence[float]]], xlabel: str) -> None:
    for label, values in series:
        n = len(values)
        if n == 0:
            continue
        step = max(1, n // 2000)  # plot at most ~2000 points per curve
        xs = [values[i] * 1000.0 for i in range(0, n, step)] + [values[-1] * 1000.0]
        ys = [i / n for i in range(0, n, step)] + [1.0]
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()


def plot_report(report: SimReport, out_dir: str | Path, sla_ms: tuple[float, float] | None = None) -> list[Path]:
    """Write ttft_cdf.png, tpot_cdf.png and power.png into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, values, label, idx in (("ttft_cdf.png", report.ttft_s_sorted, "TTFT (ms)", 0),
                                     ("tpot_cdf.png", report.tpot_s_sorted, "TPOT (ms)", 1)):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        _cdf_axes(ax, [("simulated", values)], label)
        if sla_ms is not None:
            ax.axvline(sla_ms[idx], color="red", linestyle="--", label=f"SLA {sla_ms[idx]:g} ms")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    series = report.power_w_over_time
    ax.plot([i * report.power_bucket_s for i in range(len(series))], series, linewidth=0.8)
    ax.axhline(report.avg_power_w, color="gray", linestyle=":", label=f"avg {report.avg_power_w:,.0f} W")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel(f"fleet power (W, {report.power_bucket_s:g}s mean)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "power.png")
    plt.close(fig)
    paths.append(out / "power.png")
    return paths

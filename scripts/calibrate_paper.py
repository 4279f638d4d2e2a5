#!/usr/bin/env python
"""Fit the H100 and Gaudi 2 GEMM curves on part of the seed paper's measurements; predict the rest.

    .venv/bin/python scripts/calibrate_paper.py [--out benchmarks/calibrate_paper.json] [--all]

Prints train and held-out points (measured vs predicted TFLOPS, relative error) and writes JSON with
the fitted curves, every row, and the environment. The split is fixed in the measurement file
(cluster_configs/hardware/measurements/paper-002-gemm.yaml). `--all` also fits on every point and
prints the curves as catalog YAML lines (what cluster_configs/hardware/{h100-sxm,gaudi2}.yaml ship).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.core.cost_model import CostModel  # noqa: E402
from orchestrator.core.gemm_fit import (  # noqa: E402
    PAPER_MEASUREMENTS,
    catalog_with_fits,
    evaluate,
    fit_split,
    load_gemm_measurements,
)
from orchestrator.core.hardware import GemmKind, HardwareCatalog  # noqa: E402
from orchestrator.core.model_shape import PRESETS  # noqa: E402
from orchestrator.core.types import KVDtype, LinearMode  # noqa: E402

TOLERANCE = 0.10


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _findings(cost: CostModel) -> dict[str, float]:
    """The paper's qualitative claims, as ratios computed by the fitted cost model."""

    def gemm_speedup(shape: tuple[int, int, int], kind: GemmKind) -> float:
        return cost.gemm_time_s("h100-sxm", *shape, kind) / cost.gemm_time_s("gaudi2", *shape, kind)

    def fp8_decode_gain(hw: str) -> float:
        b = [1024] * 64
        bf16 = cost.decode_step_time_s(hw, b, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
        return bf16 / cost.decode_step_time_s(hw, b, linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=KVDtype.BF16) - 1

    return {
        "thin GEMM (64,4096,4096) fp8: gaudi2 speed / h100 speed": gemm_speedup((64, 4096, 4096), GemmKind.FP8_ROWWISE),
        "thin GEMM (32,14336,4096) fp8: gaudi2 / h100": gemm_speedup((32, 14336, 4096), GemmKind.FP8_ROWWISE),
        "square GEMM 8192^3 fp8: h100 / gaudi2": 1 / gemm_speedup((8192, 8192, 8192), GemmKind.FP8_ROWWISE),
        "prefill 4096 tokens fp8: h100 / gaudi2": cost.prefill_time_s("gaudi2", 4096) / cost.prefill_time_s("h100-sxm", 4096),
        "decode step b=64 ctx=512: gaudi2 / h100": cost.decode_step_time_s("h100-sxm", [512] * 64)
        / cost.decode_step_time_s("gaudi2", [512] * 64),
        "decode step b=16 ctx=32768: h100 / gaudi2": cost.decode_step_time_s("gaudi2", [32768] * 16)
        / cost.decode_step_time_s("h100-sxm", [32768] * 16),
        "fp8 decode gain over bf16, b=64 ctx=1024: gaudi2": fp8_decode_gain("gaudi2"),
        "fp8 decode gain over bf16, b=64 ctx=1024: h100": fp8_decode_gain("h100-sxm"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", default=str(PAPER_MEASUREMENTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "calibrate_paper.json"))
    ap.add_argument("--all", action="store_true", help="also fit on all points and print catalog YAML lines")
    args = ap.parse_args(argv)

    catalog = HardwareCatalog.load_default()
    points = load_gemm_measurements(args.measurements)
    t0 = time.perf_counter()
    fits = fit_split(points, catalog, source="fit on the train split of paper Tables 1, 4, 8, 9")
    fit_s = time.perf_counter() - t0
    rows = evaluate(points, fits, catalog)

    header = f"{'device':9} {'kind':12} {'M':>5} {'K':>5} {'N':>5} {'split':8} {'measured':>9} {'predicted':>9} {'error':>7}  source"
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r.point.device, r.point.kind.value, r.point.split != "train",
                                         r.point.m * r.point.k, r.point.source)):
        p = r.point
        flag = "  <- over 10%" if p.split == "held-out" and abs(r.error) > TOLERANCE else ""
        print(f"{p.device:9} {p.kind.value:12} {p.m:5d} {p.k:5d} {p.n:5d} {p.split:8} {p.tflops:9.1f} "
              f"{r.predicted_tflops:9.1f} {r.error * 100:+6.1f}%  {p.source}{flag}")
    held = [r for r in rows if r.point.split == "held-out"]
    misses = [r for r in held if abs(r.error) > TOLERANCE]
    print(f"\nheld-out: {len(held) - len(misses)}/{len(held)} within {TOLERANCE:.0%}; "
          f"max |error| {max(abs(r.error) for r in held):.1%}; fit took {fit_s:.2f} s")
    for (device, kind), c in sorted(fits.items()):
        print(f"fit {device:9} {kind.value:12} latency {c.latency_s * 1e6:5.2f} us  floor {c.floor_s * 1e6:5.2f} us  "
              f"stream {c.stream_bw_tbps:5.2f} TB/s  eff_max {c.eff_max:.3f}  half {c.half_size:6.0f}  n {c.hill_n:.2f}")

    findings = _findings(CostModel(PRESETS["llama-3.1-8b-shape"], catalog_with_fits(catalog, fits)))
    print("\nfindings from the train-split model (Llama-3.1-8B shape; ratio > 1: the first device is faster):")
    for name, v in findings.items():
        print(f"  {name:62} {v:7.3f}")

    all_fits = {}
    if args.all:
        all_fits = fit_split(points, catalog, splits=("train", "held-out"),
                             source="fit: scripts/calibrate_paper.py --all on paper Tables 1, 4, 8, 9 (all points)")
        print("\n# catalog lines (fit on all points):")
        for (device, kind), c in sorted(all_fits.items()):
            print(f"# {device}\n  {kind.value}: {{latency_s: {c.latency_s:.3g}, eff_max: {c.eff_max:.4g}, "
                  f"half_size: {c.half_size:.4g}, hill_n: {c.hill_n:.3g}, stream_bw_tbps: {c.stream_bw_tbps:.4g}, "
                  f"floor_s: {c.floor_s:.3g}, source: \"{c.source}\"}}")

    out = {
        "benchmark": "calibrate_paper",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": f"{platform.node()} ({platform.machine()}, CPU only: this is a fit, not a measurement)",
        "versions": {"python": platform.python_version(), "git_commit": _git_commit()},
        "measurements": str(Path(args.measurements).relative_to(ROOT) if Path(args.measurements).is_relative_to(ROOT)
                            else args.measurements),
        "tolerance": TOLERANCE,
        "fits_train": {f"{d}/{k.value}": c.as_dict() for (d, k), c in sorted(fits.items())},
        "fits_all": {f"{d}/{k.value}": c.as_dict() for (d, k), c in sorted(all_fits.items())},
        "rows": [
            {"device": r.point.device, "kind": r.point.kind.value, "m": r.point.m, "k": r.point.k, "n": r.point.n,
             "split": r.point.split, "source": r.point.source, "measured_tflops": r.point.tflops,
             "predicted_tflops": round(r.predicted_tflops, 3), "error": round(r.error, 4)}
            for r in rows
        ],
        "findings_train_split_model": findings,
        "held_out_within_tolerance": len(held) - len(misses),
        "held_out_total": len(held),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

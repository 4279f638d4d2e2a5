"""Benchmark every FP8 kernel of workers/kernels on one GPU beside the stock calls it replaces.

Usage (on the GPU machine, repo root):  python scripts/bench_kernels.py [--sweep] [--only thin,prefill,...]
                                          [--out benchmarks/h100-kernels-DATE.json]
Prints a table per kernel and a targets summary last; writes all numbers as JSON with device, date and
versions. --sweep tries every thin-GEMM / prefill-GEMM launch config and records the winners (the source of
workers/kernels/configs.py). See workers/kernels/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.kernels import bench_suite as S  # noqa: E402
from workers.kernels.bench_prefill_attn import bench_prefill_attention, host_overhead  # noqa: E402
from workers.kernels.benchmarking import bf16_peak_tflops, copy_tbps, env_info, table  # noqa: E402

SECTIONS = ("quant", "kv_write", "prefill", "thin", "packed_prefill", "attention", "attn_variants", "prefill_attn",
            "attn_host")


def summarize(res: dict) -> list[dict]:
    """The issue's targets, each with the measured figure and pass/fail."""
    out = []
    for r in res.get("prefill", []):
        if (r["N"], r["K"]) == (14336, 4096):
            out.append(dict(target=f"prefill linear {r['M']}x4096x14336 incl. quant >= 1.6x bf16",
                            measured=round(r["fp8_incl_standalone_quant_vs_bf16"], 3),
                            fused=round(r["fp8_incl_fused_quant_vs_bf16"], 3),
                            ok=r["fp8_incl_standalone_quant_vs_bf16"] >= 1.6))
    thin = [r for r in res.get("thin", []) if r["M"] <= 64]
    if thin:
        def rate(r: dict) -> float:  # the engine's layout (tile-packed down projection), else the row-major best
            return r.get("engine_weight_TBps", r["thin_weight_TBps"])

        for (N, K) in sorted({(r["N"], r["K"]) for r in thin}):
            worst = min((r for r in thin if (r["N"], r["K"]) == (N, K)), key=rate)
            out.append(dict(target=f"thin GEMM M=1..64 {N}x{K} ({worst.get('engine_layout', 'row-major')}) >= 2.6 TB/s"
                                   f" (read ceiling {worst['read_ceiling_TBps']:.2f})",
                            measured=round(rate(worst), 3), where=f"M={worst['M']}", ok=rate(worst) >= 2.6))
        for r in thin:
            if (r["M"], r["N"], r["K"]) == (64, 4096, 4096):
                out.append(dict(target="thin (64,4096,4096) >= 250 TFLOPS", measured=round(r["thin_TFLOPS"], 1),
                                ok=r["thin_TFLOPS"] >= 250))
                if r.get("thin_TFLOPS_short_graph") is not None:
                    out.append(dict(target="  same, graphs of 16 calls (sessions 1-4 method)",
                                    measured=round(r["thin_TFLOPS_short_graph"], 1),
                                    ok=r["thin_TFLOPS_short_graph"] >= 250))
    for T in sorted({r["T"] for r in res.get("prefill_attn", [])}):
        rs = [r for r in res["prefill_attn"] if r["T"] == T and r.get("ms")]
        sdpa = [r for r in rs if r["what"].startswith("sdpa")]
        total = [r for r in rs if r.get("best")]
        if sdpa and total:
            fastest = min(sdpa, key=lambda r: r["ms"])
            out.append(dict(target=f"prefill attention T={T}: fp8 total / fastest bf16 SDPA ({fastest['what']})",
                            measured=round(total[0]["ms"] / fastest["ms"], 3), ok=total[0]["ms"] < fastest["ms"]))
    for r in res.get("attention", []):
        if r["ctx"] == 8192:
            out.append(dict(target=f"attention fp8/bf16 per call at 8K, B={r['B']} <= 0.6",
                            measured=round(r["fp8_over_bf16"], 3), ok=r["fp8_over_bf16"] <= 0.6))
    fit = S.attention_fit(res.get("attention", []))
    if fit:
        res["attention_fit_b1"] = fit
        out.append(dict(target=f"attention B=1 fp8/bf16 per KV token (fit over {fit['points']} contexts 2K-32K; fixed "
                               f"{fit['fp8_fixed_us']:.1f} / {fit['bf16_fixed_us']:.1f} us per call) <= 0.6",
                        measured=round(fit["per_token_fp8_over_bf16"], 3), ok=fit["per_token_fp8_over_bf16"] <= 0.6))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="try every launch config and record the winners")
    ap.add_argument("--only", default=",".join(s for s in SECTIONS if s != "attn_variants"),
                    help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/)")
    ap.add_argument("--thin-ms", default="1,2,4,8,16,32,64,128,256", help="token counts of the thin section")
    ap.add_argument("--attn-sweep", action="store_true", help="prefill_attn: try every launch config")
    ap.add_argument("--wide", action="store_true", help="with --sweep: also tile M in the thin sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    res: dict = {"env": env_info(), "copy_TBps": copy_tbps(), "bf16_8192_TFLOPS": bf16_peak_tflops(),
                 "reference": {"square": S.REF_SQUARE, "paper": S.PAPER}, "sweep": args.sweep}
    print(f"{res['env']}\ncopy {res['copy_TBps']:.2f} TB/s, bf16 8192^3 {res['bf16_8192_TFLOPS']:.0f} TFLOPS", flush=True)
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks"),
                                   f"kernels-{res['env'].get('device', 'gpu').split()[-1].lower()}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    runs = {"quant": S.bench_quant, "kv_write": S.bench_kv_write, "prefill": lambda: S.bench_prefill(args.sweep),
            "thin": lambda: S.bench_thin(args.sweep, tuple(int(m) for m in args.thin_ms.split(",")), args.wide),
            "packed_prefill": S.bench_packed_prefill, "attention": S.bench_attention,
            "attn_variants": S.bench_attention_variants,
            "prefill_attn": lambda: bench_prefill_attention(args.sweep or args.attn_sweep),
            "attn_host": host_overhead}
    for name in SECTIONS:
        if name in only:
            t0 = time.time()
            res[name] = runs[name]()
            print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
            Path(out).write_text(json.dumps(res, indent=1, default=str))  # partial results survive a timeout
    res["targets"] = summarize(res)
    cols = {
        "quant": ["kernel", "M", "D", "fused_us", "bf16_out_us", "torch_unfused_us", "fused_TBps"],
        "kv_write": ["T", "fp8_us", "bf16_us", "fp8_TBps"],
        "prefill": ["M", "N", "K", "bf16_TFLOPS", "scaled_mm_TFLOPS", "triton_TFLOPS", "quant_standalone_us",
                    "quant_fused_marginal_us", "fp8_incl_standalone_quant_vs_bf16", "fp8_incl_fused_quant_vs_bf16",
                    "stock_unfused_vs_bf16"],
        "thin": ["M", "N", "K", "thin_us", "thin_weight_TBps", "thin_TFLOPS", "thin_us_short_graph", "scaled_mm_weight_TBps",
                 "bf16_weight_TBps", "ref_stock_fp8_TBps", "fp8_vs_bf16_speedup", "engine_layout", "engine_weight_TBps"],
        "packed_prefill": ["M", "N", "K", "scaled_mm_us", "triton_rowmajor_us", "triton_packed_us", "packed_over_scaled_mm"],
        "attention": ["B", "ctx", "fp8_us", "bf16_us", "fp8_TBps", "bf16_TBps", "fp8_over_bf16"],
        "attn_variants": ["kv", "splits", "cfg", "us", "TBps"],
        "prefill_attn": ["T", "what", "ms", "TFLOPS", "rel_err_vs_fp32"],
        "attn_host": ["T", "what", "host_us_per_call", "syncs_or_copies"],
    }
    for name in SECTIONS:
        if name in res:
            print(table(f"\n== {name} ==", res[name], cols[name]))
    print(table("\n== targets ==", res["targets"], ["target", "measured", "ok"]))
    Path(out).write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write a calibration profile for one device from a measurement JSON (and optionally a power JSON).

Measure (on a CUDA machine; needs only torch, no yaml):

    python scripts/calibrate_hw.py --measure-to h100-gemm.json [--model llama-3.1-8b-shape]

times bf16 / fp8 row-wise / fp8 per-tensor GEMMs (torch.mm, torch._scaled_mm) on the paper's shapes and
the model's linear shapes (weights rotated so they stream from HBM), a device copy, and whole
"linear stacks" of the model (every linear GEMM of every layer plus the LM head, back to back, as a
decode step at M = 1..64 and a prefill at M = 4096) that `--check-stacks` compares with the cost model.
Then fit (anywhere):

    .venv/bin/python scripts/calibrate_hw.py --device h100-sxm \
        --measurements ../shared/reference/h100-baseline-2026-11-22.json \
        --power ../shared/reference/h100-power-2026-11-22.json \
        --out benchmarks/profiles/h100-sxm.json

The profile (format tandem-calibration/1, see orchestrator/core/calibration.py) carries one fitted
GemmCurve per GEMM kind measured, plus copy bandwidth and board power by phase where measured.
Load it with `CalibrationProfile.load(path)` and pass it to `CostModel(..., profile=...)`.
Prints the fit (measured vs predicted, in-sample) as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.core.model_shape import PRESETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-to", help="measure on this CUDA device and write the measurement JSON here")
    ap.add_argument("--model", default="llama-3.1-8b-shape", help="model shape for --measure-to stacks")
    ap.add_argument("--eager", action="store_true", help="--measure-to: time eager calls, not CUDA graphs")
    ap.add_argument("--forward", action="store_true",
                    help="--measure-to: time whole bf16 forward steps (prefill, decode) instead of GEMMs")
    ap.add_argument("--check-forward",
                    help="forward JSON (from --forward): fit the non-GEMM terms on its train steps into the profile "
                         "and compare every step with the cost model")
    ap.add_argument("--device", help="hardware catalog key, e.g. h100-sxm")
    ap.add_argument("--measurements", help="measurement JSON (reference baseline or generic)")
    ap.add_argument("--power", help="power JSON with rows of {phase, power_w}")
    ap.add_argument("--out", help="profile JSON to write")
    ap.add_argument("--check-stacks", action="store_true",
                    help="compare measured linear stacks with the cost model (catalog and fitted profile)")
    args = ap.parse_args(argv)
    if args.measure_to:
        measure(args.measure_to, PRESETS[args.model], graphs=not args.eager, forward=args.forward)
        return 0
    if not (args.device and args.measurements and args.out):
        ap.error("fitting needs --device, --measurements and --out (or use --measure-to)")
    return fit(args)


def fit(args: argparse.Namespace) -> int:
    from orchestrator.core.calibration import (
        CalibrationProfile,
        overrides_from_measurements,
        points_from_measurements,
        profile_from_measurements,
    )
    from orchestrator.core.gemm_fit import predict_tflops, relative_error
    from orchestrator.core.hardware import GemmKind, HardwareCatalog

    catalog = HardwareCatalog.load_default()
    spec = catalog[args.device]
    doc = json.loads(Path(args.measurements).read_text())
    power_doc = json.loads(Path(args.power).read_text()) if args.power else None
    source = Path(args.measurements).name
    points = points_from_measurements(doc, args.device, source)
    if not points:
        print(f"calibrate_hw: no GEMM measurements found in {args.measurements}", file=sys.stderr)
        return 2
    overrides = overrides_from_measurements(doc, power_doc)
    peaks = {k: spec.peak_tflops(k) for k in GemmKind}
    profile = profile_from_measurements(
        args.device, points, peaks, overrides,
        source=source + (f" + {Path(args.power).name}" if args.power else ""),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    curves = profile.devices[args.device].gemm
    print(f"{'kind':12} {'M':>5} {'K':>6} {'N':>6} {'measured':>9} {'predicted':>9} {'error':>7}")
    errs = []
    for p in points:
        pred = predict_tflops(curves[p.kind], p, peaks[p.kind])
        errs.append(abs(relative_error(pred, p.tflops)))
        print(f"{p.kind.value:12} {p.m:5d} {p.k:6d} {p.n:6d} {p.tflops:9.1f} {pred:9.1f} "
              f"{relative_error(pred, p.tflops) * 100:+6.1f}%")
    print(f"\nin-sample: median |error| {sorted(errs)[len(errs) // 2]:.1%}, max {max(errs):.1%}")
    for kind, c in curves.items():
        print(f"{kind.value:12} latency {c.latency_s * 1e6:.2f} us floor {c.floor_s * 1e6:.2f} us "
              f"stream {c.stream_bw_tbps:.2f} TB/s eff_max {c.eff_max:.3f} half {c.half_size:.0f} n {c.hill_n:.2f}")
    for name, v in overrides.items():
        print(f"override {name} = {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    print(f"wrote {args.out}")
    if args.check_stacks and doc.get("stacks"):
        check_stacks(doc, args.device, catalog, CalibrationProfile.load(args.out))
    if args.check_forward:
        check_forward(json.loads(Path(args.check_forward).read_text()), args.device, catalog,
                      CalibrationProfile.load(args.out), args.out)
    return 0


def check_forward(doc: dict, device: str, catalog, profile, out_path: str) -> None:  # noqa: ANN001
    """Fit the non-GEMM terms (per-layer overheads, elementwise factor) on the train split of measured
    bf16 forward steps, add them to the profile at `out_path`, and print every step measured vs
    predicted (cost model less step_overhead_s, the host work the measurement does not do)."""
    from types import MappingProxyType

    from orchestrator.core.calibration import (
        CalibrationProfile,
        DeviceCalibration,
        fit_non_gemm,
        forward_steps,
    )
    from orchestrator.core.cost_model import CostModel
    from orchestrator.core.types import KVDtype, LinearMode

    shape = PRESETS[doc["forward"]["model"]]
    steps = forward_steps(doc)
    gemm_only = CostModel(shape, catalog, profile=profile)
    fitted = fit_non_gemm(gemm_only, device, [s for s in steps if s.split == "train"],
                          linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
    dev = profile.devices[device]
    overrides = {**dev.overrides, **fitted}
    profile = CalibrationProfile(MappingProxyType({**profile.devices, device: DeviceCalibration(
        dev.gemm, MappingProxyType(overrides), dev.points)}), profile.source + " + forward steps", profile.created)
    profile.save(out_path)
    full = CostModel(shape, catalog, profile=profile)
    print(f"\nnon-GEMM fit on the train steps: prefill {fitted['prefill_layer_overhead_s'] * 1e6:.1f} us/layer, "
          f"decode {fitted['decode_layer_overhead_s'] * 1e6:.1f} us/layer, elementwise x{fitted['elementwise_factor']:.2f}"
          f"; rewrote {out_path}")
    print(f"bf16 forward steps of {shape.name} (cost model less step_overhead_s):")
    print(f"{'step':28} {'split':8} {'measured ms':>12} {'GEMM-only profile':>18} {'err':>7} {'+ non-GEMM fit':>15} {'err':>7}")
    for st in steps:
        preds = []
        for c in (gemm_only, full):
            o = c.spec(device).step_overhead_s
            if st.phase == "prefill":
                t = c.prefill_time_s(device, st.tokens, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
            else:
                t = c.decode_step_time_s(device, [st.context] * st.batch, linear_mode=LinearMode.BF16,
                                         kv_dtype=KVDtype.BF16)
            preds.append((t - o) * 1e3)
        name = f"prefill {st.tokens} tokens" if st.phase == "prefill" else f"decode b={st.batch} ctx={st.context}"
        print(f"{name:28} {st.split:8} {st.ms:12.3f} {preds[0]:18.3f} {(preds[0] / st.ms - 1) * 100:+6.1f}% "
              f"{preds[1]:15.3f} {(preds[1] / st.ms - 1) * 100:+6.1f}%")


def check_stacks(doc: dict, device: str, catalog, profile) -> None:
    """Measured linear stacks (all linear GEMMs + LM head of one forward step) vs the cost model's
    `linear_time_s + lm_head_time_s`, with the catalog's curves and with the fitted profile."""
    from orchestrator.core.cost_model import CostModel
    from orchestrator.core.types import LinearMode

    shape = PRESETS[doc["stacks"]["model"]]
    plain, fitted = CostModel(shape, catalog), CostModel(shape, catalog, profile=profile)
    print(f"\nlinear stacks of {shape.name} (all layers' linear GEMMs + LM head, back to back):")
    print(f"{'mode':12} {'M':>5} {'measured ms':>12} {'catalog ms':>11} {'err':>7} {'profile ms':>11} {'err':>7}")
    for r in doc["stacks"]["rows"]:
        mode = LinearMode(r["mode"])
        m = int(r["m"])
        meas = float(r["ms"])
        preds = [(c.linear_time_s(device, m, mode) + c.lm_head_time_s(device, m)) * 1e3 for c in (plain, fitted)]
        print(f"{mode.value:12} {m:5d} {meas:12.3f} {preds[0]:11.3f} {(preds[0] / meas - 1) * 100:+6.1f}% "
              f"{preds[1]:11.3f} {(preds[1] / meas - 1) * 100:+6.1f}%")


# ---------------------------------------------------------------------------------------- measuring
PAPER_THIN = [(m, k, k) for k in (1024, 2048, 4096) for m in (8, 16, 32, 64)]
SQUARES = [(s, s, s) for s in (1024, 2048, 4096, 8192)]
STACK_ROWS = (1, 8, 16, 32, 64, 128, 256, 4096)


def measure(out_path: str, shape, graphs: bool = True, forward: bool = False) -> None:  # noqa: ANN001
    """Time GEMMs, a copy and the model's linear stacks on the current CUDA device; write JSON.
    graphs: time CUDA-graph replays (kernel time, as a graph-captured engine runs) instead of eager calls."""
    import datetime as dt_
    import statistics

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("calibrate_hw --measure-to needs a CUDA device")
    dev = torch.device("cuda")
    f8 = torch.float8_e4m3fn
    torch.manual_seed(0)

    def bench_ms(fn, target_ms: float = 20.0, eager: bool = False) -> float:
        """Median ms per call of fn(i): eager back-to-back calls, or (graphs) replays of a CUDA graph
        of n captured calls, which removes the host's per-launch cost as a serving engine does."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(3):
            fn(i)
        e.record()
        e.synchronize()
        est_ms = max(s.elapsed_time(e) / 3, 1e-3)
        if graphs and not eager:
            calls = max(1, min(50, int(2.0 / est_ms)))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(i)
            g.replay()
            torch.cuda.synchronize()
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            reps = max(2, min(500, int(target_ms / max(s.elapsed_time(e), 1e-3))))
            times = []
            for _ in range(5):
                s.record()
                for _ in range(reps):
                    g.replay()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / (reps * calls))
            del g
            return statistics.median(times)
        n = max(3, min(500, int(target_ms / est_ms)))
        times = []
        for _ in range(5):
            s.record()
            for i in range(n):
                fn(i)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / n)
        return statistics.median(times)

    def gemm_fns(m: int, k: int, n: int, copies: int):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        a8 = a.to(f8)
        w8 = [w.to(f8) for w in ws]
        sa_row = torch.ones(m, 1, device=dev, dtype=torch.float32)
        sb_row = torch.ones(1, n, device=dev, dtype=torch.float32)
        one = torch.ones((), device=dev, dtype=torch.float32)
        return {
            "bf16": lambda i: torch.mm(a, ws[i % copies].t()),
            "fp8_rowwise": lambda i: torch._scaled_mm(a8, w8[i % copies].t(), scale_a=sa_row, scale_b=sb_row,
                                                      out_dtype=torch.bfloat16, use_fast_accum=True),
            "fp8_tensor": lambda i: torch._scaled_mm(a8, w8[i % copies].t(), scale_a=one, scale_b=one,
                                                     out_dtype=torch.bfloat16, use_fast_accum=True),
        }

    if forward:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": dt_.datetime.now(dt_.UTC).isoformat(timespec="seconds"),
               "method": "bf16 Llama forward in plain torch (RMSNorm, RoPE, SDPA flash attention with GQA, "
                         "SiLU-mul, residuals, LM head); prefill eager, decode steps replayed from a CUDA graph",
               "forward": measure_forward(torch, shape, bench_ms)}
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {out_path}")
        return

    h, ai = shape.hidden_size, shape.intermediate_size
    qkv_n = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    model_kn = [(h, qkv_n), (shape.num_heads * shape.head_dim, h), (h, 2 * ai), (ai, h)]
    shapes = PAPER_THIN + SQUARES + [(m, k, n) for m in (1, 16, 64, 128, 256, 4096) for k, n in model_kn]
    rows = []
    for m, k, n in shapes:
        copies = max(1, min(32, (256 << 20) // (k * n)))  # > L2: every call streams its weights
        fns = gemm_fns(m, k, n, copies)
        for kind, fn in fns.items():
            try:
                ms = bench_ms(fn)
            except RuntimeError as err:  # e.g. a shape _scaled_mm refuses
                print(f"skip {kind} {(m, k, n)}: {err}")
                continue
            rows.append({"kind": kind, "m": m, "k": k, "n": n, "tflops": 2 * m * k * n / (ms * 1e-3) / 1e12})
            print(f"{kind:12} {m:5d} {k:6d} {n:6d} {rows[-1]['tflops']:9.1f} TFLOPS")
        del fns
        torch.cuda.empty_cache()

    bufs = [torch.empty(1 << 29, device=dev, dtype=torch.bfloat16) for _ in range(2)]  # 2 x 1 GiB
    graphs_for_gemms, graphs = graphs, False  # one 1 GiB copy has no launch cost to hide: time it eagerly
    copy_ms = bench_ms(lambda i: bufs[1].copy_(bufs[0]))
    graphs = graphs_for_gemms
    copy_tbps = 2 * bufs[0].numel() * 2 / (copy_ms * 1e-3) / 1e12
    bufs.clear()

    # linear stacks: every layer's QKV, O, gate|up, down (distinct weights per layer) + the bf16 LM head
    layers = shape.num_layers
    wb = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for k, n in model_kn] for _ in range(layers)]
    w8 = [[w.to(f8) for w in lw] for lw in wb]
    lm = torch.randn(shape.vocab_size, h, device=dev, dtype=torch.bfloat16) * 0.02
    stack_rows = []
    def stack(mode: str, xs: dict, x8: dict, sa, sbs: dict, one) -> None:  # noqa: ANN001
        for li in range(layers):
            for j, (k, n) in enumerate(model_kn):
                if mode == "bf16":
                    torch.mm(xs[k], wb[li][j].t())
                elif mode == "fp8-dynamic":
                    torch._scaled_mm(x8[k], w8[li][j].t(), scale_a=sa, scale_b=sbs[n], out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
                else:
                    torch._scaled_mm(x8[k], w8[li][j].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
        torch.mm(xs[h], lm.t())

    for m in STACK_ROWS:
        xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k, _ in model_kn}
        args = (xs, {k: v.to(f8) for k, v in xs.items()}, torch.ones(m, 1, device=dev, dtype=torch.float32),
                {n: torch.ones(1, n, device=dev, dtype=torch.float32) for _, n in model_kn},
                torch.ones((), device=dev, dtype=torch.float32))
        for mode in ("bf16", "fp8-dynamic", "fp8-static"):
            ms = bench_ms(lambda i, mode=mode, args=args: stack(mode, *args), target_ms=200.0)
            stack_rows.append({"mode": mode, "m": m, "ms": ms})
            print(f"stack {mode:12} M={m:5d} {ms:9.3f} ms")
    out = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": dt_.datetime.now(dt_.UTC).isoformat(timespec="seconds"),
        "method": ("CUDA events, median of 5 runs; " + ("replays of CUDA graphs of n captured calls"
                   if graphs else "n back-to-back eager calls") + "; weights rotated past L2; fp8 via "
                   "torch._scaled_mm (fast accum), bf16 via torch.mm"),
        "timing": "cuda-graph" if graphs else "eager",
        "copy_TBps": copy_tbps, "gemm": rows, "stacks": {"model": shape.name, "rows": stack_rows},
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"copy {copy_tbps:.2f} TB/s; wrote {out_path}")


FORWARD_PREFILL = (512, 4096, 16384)
FORWARD_DECODE = ((1, 1024), (16, 1024), (64, 1024), (1, 32768), (16, 8192))  # (batch, context)


def measure_forward(torch, shape, bench_ms, device: str = "cuda") -> dict:  # noqa: ANN001
    """Time whole bf16 forward steps of `shape` (random weights): prefill of one prompt, decode steps."""
    import torch.nn.functional as F

    dev = torch.device(device)
    L, h, ai, nh, nkv, d = (shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.num_heads,
                            shape.num_kv_heads, shape.head_dim)
    W = [{"qkv": torch.randn((nh + 2 * nkv) * d, h, device=dev, dtype=torch.bfloat16) * 0.02,
          "o": torch.randn(h, nh * d, device=dev, dtype=torch.bfloat16) * 0.02,
          "gu": torch.randn(2 * ai, h, device=dev, dtype=torch.bfloat16) * 0.02,
          "down": torch.randn(h, ai, device=dev, dtype=torch.bfloat16) * 0.02,
          "n1": torch.ones(h, device=dev, dtype=torch.bfloat16), "n2": torch.ones(h, device=dev, dtype=torch.bfloat16)}
         for _ in range(L)]
    lm = torch.randn(shape.vocab_size, h, device=dev, dtype=torch.bfloat16) * 0.02

    def rms(x, w):  # noqa: ANN001
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w

    def rope(x, cos, sin):  # noqa: ANN001 - x: [B, heads, T, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def layer_stack(x, attend, cos, sin):  # noqa: ANN001 - x: [B, T, h]
        B, T, _ = x.shape
        for lw in W:
            r = x
            qkv = rms(x, lw["n1"]) @ lw["qkv"].t()
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            q = rope(q.view(B, T, nh, d).transpose(1, 2), cos, sin)
            k = rope(k.view(B, T, nkv, d).transpose(1, 2), cos, sin)
            a = attend(q, k, v.view(B, T, nkv, d).transpose(1, 2), lw)
            x = r + a.transpose(1, 2).reshape(B, T, nh * d) @ lw["o"].t()
            g, u = (rms(x, lw["n2"]) @ lw["gu"].t()).chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ lw["down"].t()
        return x

    rows = []
    for T in FORWARD_PREFILL:
        x = torch.randn(1, T, h, device=dev, dtype=torch.bfloat16)
        cos = torch.randn(T, d // 2, device=dev, dtype=torch.bfloat16)
        sin = torch.randn(T, d // 2, device=dev, dtype=torch.bfloat16)

        def prefill(i, x=x, cos=cos, sin=sin) -> None:  # noqa: ANN001
            y = layer_stack(x, lambda q, k, v, lw: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True), cos, sin)
            (y[:, -1] @ lm.t())

        ms = bench_ms(prefill, target_ms=300.0, eager=True)
        rows.append({"phase": "prefill", "tokens": T, "ms": ms})
        print(f"forward prefill T={T:6d} {ms:9.3f} ms")
    for b, ctx in FORWARD_DECODE:
        caches = [(torch.randn(b, nkv, ctx + 1, d, device=dev, dtype=torch.bfloat16),
                   torch.randn(b, nkv, ctx + 1, d, device=dev, dtype=torch.bfloat16)) for _ in range(L)]
        x = torch.randn(b, 1, h, device=dev, dtype=torch.bfloat16)
        cos = torch.randn(1, d // 2, device=dev, dtype=torch.bfloat16)
        sin = torch.randn(1, d // 2, device=dev, dtype=torch.bfloat16)
        it = {"layer": 0}

        def attend(q, k, v, lw, caches=caches, ctx=ctx, it=it):  # noqa: ANN001
            kc, vc = caches[it["layer"] % L]
            it["layer"] += 1
            kc[:, :, ctx:ctx + 1] = k
            vc[:, :, ctx:ctx + 1] = v
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

        def decode(i, x=x, cos=cos, sin=sin, attend=attend) -> None:  # noqa: ANN001
            y = layer_stack(x, attend, cos, sin)
            (y[:, -1] @ lm.t())

        ms = bench_ms(decode, target_ms=200.0)
        rows.append({"phase": "decode", "batch": b, "context": ctx, "ms": ms})
        print(f"forward decode b={b:3d} ctx={ctx:6d} {ms:9.3f} ms")
        del caches
        torch.cuda.empty_cache()
    return {"model": shape.name, "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())

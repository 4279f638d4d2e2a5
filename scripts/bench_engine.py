"""Prefill time and decode tokens/s of a Llama-3.1-8B-shaped model on one GPU: bf16 vs FP8.

Usage (GPU machine, repo root): python scripts/bench_engine.py [--engine] [--out PATH] [--batches 1,16,64]
                                  [--contexts 1024,2048,8192] [--prompts 1024,8192]
Default (stack mode): workers/kernels/bench_stack.Stack (random weights; the engine's hot path written with
the kernels; decode steps replayed as CUDA graphs). With --engine: the real workers.engine.Engine (see
scripts/_bench_engine_real.py for exactly what is timed and how the KV cache is filled).
Prints a table and the two engine targets last; writes JSON with device, date and versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.kernels import prefill_attention as PA  # noqa: E402
from workers.kernels.bench_stack import (  # noqa: E402
    Shape,
    Stack,
    profile_prefill_ms,
    time_decode_step_ms,
    time_prefill_ms,
)
from workers.kernels.benchmarking import env_info, table  # noqa: E402

MODES = {"bf16": dict(fp8=False, kv_fp8=False), "fp8": dict(fp8=True, kv_fp8=True)}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="1024,2048,8192")
    ap.add_argument("--prompts", default="1024,8192")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="kernel time per part of each (longest, --engine) prefill")
    ap.add_argument("--prefill-reps", type=int, default=5, help="timed prefills per point (median)")
    ap.add_argument("--engine", action="store_true", help="measure workers.engine.Engine instead of the stack")
    ap.add_argument("--kv-tokens", type=int, default=200_000, help="--engine: KV cache capacity in tokens")
    ap.add_argument("--reps", type=int, default=10, help="--engine: timed decode steps per point")
    ap.add_argument("--lookahead", choices=("default", "on", "off"), default="default",
                    help="--engine: decode lookahead (EngineConfig.lookahead; default: on with CUDA graphs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    batches, contexts, prompts = _ints(args.batches), _ints(args.contexts), _ints(args.prompts)
    if args.engine:
        return engine_main(args, batches, contexts, prompts)
    shape = Shape(layers=args.layers)
    max_tokens = max(max(batches) * max(contexts), max(prompts))
    res: dict = {"env": env_info(), "shape": shape.__dict__, "what": "workers/kernels/bench_stack.Stack, random weights",
                 "prefill": [], "decode": []}
    print(res["env"], flush=True)
    for mode, kw in MODES.items():
        torch.cuda.empty_cache()
        probe = Stack(shape, kv_fp8=kw["kv_fp8"], fp8=kw["fp8"], max_tokens=16, distinct_kv_layers=1)
        free = torch.cuda.mem_get_info()[0]
        per_layer = 2 * max_tokens * shape.kv_heads * shape.head_dim * (1 if kw["kv_fp8"] else 2)
        per_layer += 2 * max_tokens * shape.kv_heads * 4 if kw["kv_fp8"] else 0
        distinct = max(1, min(shape.layers, int((free - (8 << 30)) // per_layer)))
        del probe
        gc.collect()
        torch.cuda.empty_cache()
        stack = Stack(shape, kv_fp8=kw["kv_fp8"], fp8=kw["fp8"], max_tokens=max_tokens, distinct_kv_layers=distinct)
        print(f"[{mode}] {distinct} distinct KV layers of {per_layer / 2**30:.2f} GiB", flush=True)
        # fp8 mode also without FP8 attention (bf16 SDPA) and with its lazy accumulator rescaling, same run
        variants = [(mode, True, False)] + ([("fp8-sdpa-attn", False, False), ("fp8-lazy-rescale", True, True)]
                                            if kw["fp8"] else [])
        for p in prompts:
            for name, fp8_attn, lazy in variants:
                stack.fp8_attn = fp8_attn and kw["fp8"]
                PA.LAZY_RESCALE = lazy
                ms = time_prefill_ms(stack, p, reps=args.prefill_reps)
                res["prefill"].append(dict(mode=name, prompt=p, prefill_ms=ms, tokens_per_s=p / ms * 1e3))
                print(f"[{name}] prefill {p}: {ms:.1f} ms", flush=True)
                if args.profile:
                    parts = profile_prefill_ms(stack, p)
                    res.setdefault("prefill_parts", []).append(dict(mode=name, prompt=p, **parts))
                    print(f"[{name}] prefill {p} parts (ms): "
                          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
        stack.fp8_attn = kw["fp8"]
        PA.LAZY_RESCALE = False
        for b in batches:
            for c in contexts:
                ms = time_decode_step_ms(stack, b, c)
                res["decode"].append(dict(mode=mode, batch=b, ctx=c, step_ms=ms, tokens_per_s=b / ms * 1e3,
                                          distinct_kv_layers=distinct))
                print(f"[{mode}] decode B={b} ctx={c}: {ms:.2f} ms/step, {b / ms * 1e3:.0f} tok/s", flush=True)
        del stack
        gc.collect()
        torch.cuda.empty_cache()
    pre = {(r["mode"], r["prompt"]): r["prefill_ms"] for r in res["prefill"]}
    dec = {(r["mode"], r["batch"], r["ctx"]): r["tokens_per_s"] for r in res["decode"]}
    rows = []
    for p in prompts:
        rows.append(dict(what=f"prefill {p} tokens, fp8/bf16 time", ratio=pre[("fp8", p)] / pre[("bf16", p)],
                         bf16=pre[("bf16", p)], fp8=pre[("fp8", p)]))
        if ("fp8-sdpa-attn", p) in pre:
            rows.append(dict(what=f"prefill {p} tokens, fp8 linears + bf16 SDPA / bf16 time",
                             ratio=pre[("fp8-sdpa-attn", p)] / pre[("bf16", p)], bf16=pre[("bf16", p)],
                             fp8=pre[("fp8-sdpa-attn", p)]))
        if ("fp8-lazy-rescale", p) in pre:
            rows.append(dict(what=f"prefill {p} tokens, fp8 with lazy attention rescaling / bf16 time",
                             ratio=pre[("fp8-lazy-rescale", p)] / pre[("bf16", p)], bf16=pre[("bf16", p)],
                             fp8=pre[("fp8-lazy-rescale", p)]))
    for b in batches:
        for c in contexts:
            rows.append(dict(what=f"decode B={b} ctx={c}, fp8/bf16 tok/s", ratio=dec[("fp8", b, c)] / dec[("bf16", b, c)],
                             bf16=dec[("bf16", b, c)], fp8=dec[("fp8", b, c)]))
    res["ratios"] = rows
    if res.get("prefill_parts"):
        cols = ["mode", "prompt"] + sorted({k for r in res["prefill_parts"] for k in r} - {"mode", "prompt"})
        print(table("\n== prefill kernel time by part (ms, torch.profiler) ==", res["prefill_parts"], cols))
    return finish(res, rows, pre, dec, "engine stack (8B shape)", args.out, "engine-stack.json")


def engine_main(args: argparse.Namespace, batches: list[int], contexts: list[int], prompts: list[int]) -> int:
    from _bench_engine_real import run_engine_bench

    res: dict = {"env": env_info(), "what": "workers.engine.Engine, llama-3.1-8b-shape, random weights",
                 "layers": args.layers}
    print(res["env"], flush=True)
    eager = (64, 2048) if 64 in batches and 2048 in contexts else None
    res.update(run_engine_bench(batches, contexts, prompts, None if args.layers == 32 else args.layers,
                                args.kv_tokens, warmup=3, reps=args.reps, prefill_reps=args.prefill_reps,
                                eager_point=eager, log=lambda m: print(m, flush=True), profile=args.profile,
                                lookahead={"default": None, "on": True, "off": False}[args.lookahead]))
    pre = {(r["mode"], r["prompt"]): r["prefill_ms"] for r in res["prefill"]}
    dec = {(r["mode"], r["batch"], r["ctx"]): r["tokens_per_s"] for r in res["decode"] if r["graphs"]}
    rows = [dict(what=f"prefill {p} tokens, fp8/bf16 time", ratio=pre[("fp8", p)] / pre[("bf16", p)],
                 bf16=pre[("bf16", p)], fp8=pre[("fp8", p)]) for p in prompts]
    rows += [dict(what=f"prefill {p} tokens, fp8 linears + bf16 SDPA / bf16 time", bf16=pre[("bf16", p)],
                  ratio=pre[("fp8-sdpa-attn", p)] / pre[("bf16", p)], fp8=pre[("fp8-sdpa-attn", p)])
             for p in prompts if ("fp8-sdpa-attn", p) in pre]
    rows += [dict(what=f"prefill {p} tokens, fp8 with lazy attention rescaling / bf16 time", bf16=pre[("bf16", p)],
                  ratio=pre[("fp8-lazy-rescale", p)] / pre[("bf16", p)], fp8=pre[("fp8-lazy-rescale", p)])
             for p in prompts if ("fp8-lazy-rescale", p) in pre]
    rows += [dict(what=f"prefill {p} tokens, unfused RoPE + KV write (before), fp8/bf16 time",
                  ratio=pre[("fp8-unfused-rope", p)] / pre[("bf16-unfused-rope", p)],
                  bf16=pre[("bf16-unfused-rope", p)], fp8=pre[("fp8-unfused-rope", p)])
             for p in prompts if ("fp8-unfused-rope", p) in pre and ("bf16-unfused-rope", p) in pre]
    for b in batches:
        for c in contexts:
            if ("fp8", b, c) in dec and ("bf16", b, c) in dec:
                rows.append(dict(what=f"decode B={b} ctx={c}, fp8/bf16 tok/s", ratio=dec[("fp8", b, c)]
                                 / dec[("bf16", b, c)], bf16=dec[("bf16", b, c)], fp8=dec[("fp8", b, c)]))
    rep = {(r["mode"], r["batch"], r["ctx"]): r.get("graph_replay_ms") for r in res["decode"] if r["graphs"]}
    for (mode, b, c), ms in sorted(rep.items()):
        if mode == "fp8" and ms and rep.get(("bf16", b, c)):
            rows.append(dict(what=f"decode B={b} ctx={c}, graph replay alone, fp8/bf16 tok/s",
                             ratio=rep[("bf16", b, c)] / ms, bf16=b / rep[("bf16", b, c)] * 1e3, fp8=b / ms * 1e3))
    if res.get("prefill_parts"):
        cols = ["mode", "prompt"] + sorted({k for r in res["prefill_parts"] for k in r} - {"mode", "prompt"})
        print(table("\n== engine prefill kernel time by part (ms, torch.profiler) ==", res["prefill_parts"], cols))
    eager_rows = [r for r in res["decode"] if not r["graphs"]]
    for r in eager_rows:
        g = next(x for x in res["decode"] if x["graphs"] and x["mode"] == r["mode"] and x["batch"] == r["batch"]
                 and x["ctx"] == r["ctx"])
        rows.append(dict(what=f"{r['mode']} decode B={r['batch']} ctx={r['ctx']}, graph/eager tok/s",
                         ratio=g["tokens_per_s"] / r["tokens_per_s"], bf16=None, fp8=None))
    res["ratios"] = rows
    return finish(res, rows, pre, dec, "workers.engine.Engine (8B shape)", args.out, "engine.json")


def finish(res: dict, rows: list[dict], pre: dict, dec: dict, title: str, out_arg: str | None, name: str) -> int:
    targets = []
    if ("fp8", 64, 2048) in dec:
        r = dec[("fp8", 64, 2048)] / dec[("bf16", 64, 2048)]
        targets.append(dict(target="decode tok/s fp8/bf16 at B=64, 2K >= 1.6", measured=round(r, 3), ok=r >= 1.6))
    if ("fp8", 8192) in pre:
        r = pre[("fp8", 8192)] / pre[("bf16", 8192)]
        targets.append(dict(target="prefill 8K time fp8/bf16 <= 0.65", measured=round(r, 3), ok=r <= 0.65))
    res["targets"] = targets
    out = out_arg or os.path.join(os.environ.get("OUT", "benchmarks"), name)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1, default=str))
    print(table(f"\n== {title} ==", rows, ["what", "bf16", "fp8", "ratio"]))
    print(table("\n== targets ==", targets, ["target", "measured", "ok"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

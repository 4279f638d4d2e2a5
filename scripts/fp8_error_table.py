"""FP8 error table: relative logit error and top-1 agreement per linear mode vs the non-FP8 baseline,
and KV round-trip error per KV dtype, on the tiny model and on a random-weight 1B shape.

    .venv/bin/python scripts/fp8_error_table.py                       # tiny + llama-3.2-1b-shape (2 layers)
    .venv/bin/python scripts/fp8_error_table.py --models tiny --out benchmarks/fp8_error_tiny.json

Prints a table and writes JSON (device, date, versions, settings, rows). The logic is in
workers/engine/fp8_error.py; the tests assert bounds on the tiny model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from orchestrator.core.types import ComputeDtype
from workers.engine import EngineConfig
from workers.engine.fp8_error import eval_prompts, kv_errors, linear_mode_errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,llama-3.2-1b-shape", help="comma-separated presets")
    ap.add_argument("--shape-layers", type=int, default=2, help="layers kept for non-tiny shape presets")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--generate", type=int, default=32, help="greedy tokens compared for the KV rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on a busy box)")
    ap.add_argument("--out", default="benchmarks/fp8_error_table.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for model in args.models.split(","):
        layers = None if model == "tiny" else args.shape_layers
        base = EngineConfig(model=model, dtype=ComputeDtype.FLOAT32, num_layers=layers, num_blocks=64,
                            block_size=16, max_model_len=args.prompt_len + args.generate + 16)
        t0 = time.perf_counter()
        prompts = eval_prompts(259 if model == "tiny" else 128256, args.prompts, args.prompt_len)
        lin = linear_mode_errors(base, prompts, progress=lambda m, name=model: print(f"  [{name}] {m}", flush=True))
        kv = kv_errors(base, prompts, args.generate)
        secs = time.perf_counter() - t0
        label = model if layers is None else f"{model} ({layers} layers)"
        results.append({"model": label, "num_layers": layers, "linear": lin, "kv": kv, "seconds": round(secs, 1)})
        print(f"\n== {label}: {args.prompts} prompts x {args.prompt_len} tokens, float32 compute, "
              f"baseline = linear bf16 mode at float32 ({secs:.0f} s)")
        print(f"(baseline's top-1 is the input token at {lin[0]['baseline_top1_is_input']:.0%} of positions)")
        print(f"{'linear':<22}{'format':<8}{'rounding':<12}{'rel logit err':>15}{'top-1 agree':>13}"
              f"{'top-1 agree, input masked':>27}")
        for r in lin:
            print(f"{r['linear']:<22}{r['format']:<8}{r['rounding']:<12}{r['rel_logit_err']:>15.4f}"
                  f"{r['top1_agreement']:>13.3f}{r['top1_agreement_excl_input']:>27.3f}")
        print(f"{'kv dtype':<22}{'kv rel err':>15}{'greedy tokens = bf16-KV run (of ' + str(args.generate) + ')':>44}")
        for r in kv:
            print(f"{r['kv_dtype']:<22}{r['kv_rel_err']:>15.4f}{r['greedy_tokens_matching_bf16_kv']:>44.2f}")

    doc = {
        "benchmark": "fp8_error_table",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": vars(args),
        "metrics": {
            "rel_logit_err": "||L - L_ref||_F / ||L_ref||_F over all prompt positions (teacher forced)",
            "top1_agreement": "fraction of positions whose argmax equals the baseline's",
            "top1_agreement_excl_input": "the same with each position's input token masked out in both "
            "(random tied-embedding models predict their input token almost everywhere)",
            "baseline_top1_is_input": "fraction of positions where the baseline's argmax is the input token",
            "kv_rel_err": "||dequant(quant(KV)) - KV||_F / ||KV||_F over the model's real K and V",
            "greedy_tokens_matching_bf16_kv": "mean greedy tokens before the first difference from the bf16-KV run",
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

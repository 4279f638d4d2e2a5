"""`tandem generate`: run the native engine on one process and print the generated tokens.

    tandem generate --model tiny --prompt "Hello" --max-tokens 16 [--dtype float32|bf16]
        [--linear bf16|fp8-dynamic|fp8-static] [--kv-dtype bf16|fp8_e4m3|fp8_e5m2] [--json]

`--json` prints one JSON object: token_ids (generated ids), text, finish_reason, prompt_token_ids and
the settings used. Errors print one line to stderr and exit 2 (bad input) — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from orchestrator.core.types import ComputeDtype, KVDtype, LinearMode, SamplingParams, TandemError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name (tiny, llama-3.2-1b-shape, ...) or a local HF directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, required=True, help="tokens to generate at most")
    parser.add_argument("--dtype", choices=[d.value for d in ComputeDtype], default=ComputeDtype.FLOAT32.value)
    parser.add_argument("--linear", choices=[m.value for m in LinearMode], default=LinearMode.BF16.value)
    parser.add_argument("--kv-dtype", choices=[k.value for k in KVDtype], default=KVDtype.BF16.value)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from workers.engine import Engine, EngineConfig

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed,
        )
        sampling.validate()
        prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(
            model=args.model, dtype=ComputeDtype(args.dtype), linear_mode=LinearMode(args.linear),
            kv_dtype=KVDtype(args.kv_dtype),
        ))
        load_s = time.perf_counter() - t0
        if prompt_ids is None:
            prompt_ids = engine.tokenizer.encode(args.prompt)
        engine.add_request("cli", prompt_ids, sampling)
        tokens: list[int] = []
        finish = None
        t1 = time.perf_counter()
        while engine.has_unfinished():
            for out in engine.step():
                if out.token_id >= 0:
                    tokens.append(out.token_id)
                finish = out.finish_reason or finish
        gen_s = time.perf_counter() - t1
        engine.assert_no_leaks()
    except (TandemError, ValueError) as exc:
        print(f"tandem generate: error: {exc}", file=sys.stderr)
        return 2
    text = engine.tokenizer.decode(tokens)
    if args.json:
        print(json.dumps({
            "model": args.model, "prompt_token_ids": prompt_ids, "token_ids": tokens, "text": text,
            "finish_reason": None if finish is None else finish.value, "dtype": args.dtype,
            "linear": args.linear, "kv_dtype": args.kv_dtype, "load_s": round(load_s, 3),
            "generate_s": round(gen_s, 3),
        }))
    else:
        print(text)
        print(f"[{len(tokens)} tokens, finish={None if finish is None else finish.value}, "
              f"load {load_s:.2f} s, generate {gen_s:.2f} s]", file=sys.stderr)
    return 0

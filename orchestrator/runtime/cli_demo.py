"""`tandem demo [--config FILE] [--colocated-config FILE] [--requests N] [--json]`

Starts a private Ray on 127.0.0.1, serves the disaggregated spec (default local-cpu.yaml: one prefill
and one decode worker, KV over gRPC) and the colocated spec (local-cpu-colocated.yaml) side by side,
sends the same mixed workload (completions and chat, streaming and not, short prompts that the
router prefills locally and long ones it sends to the prefill pool) through each HTTP API, checks
that the greedy outputs are identical token for token, prints TTFT/TPOT percentiles, routing
decisions by reason and the KV bytes that crossed the transport, checks that no KV block leaked,
and shuts everything down. Exit status 1 on any mismatch, failed request or leak.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DISAGG = REPO / "cluster_configs" / "serving" / "local-cpu.yaml"
DEFAULT_COLOC = REPO / "cluster_configs" / "serving" / "local-cpu-colocated.yaml"

PROMPTS = (
    "Hi",
    "The capital of France is",
    "Prefill is compute-bound and decode is memory-bound, so Tandem puts them on different accelerators.",
    "def fib(n):",
    "FP8 E4M3 keeps three mantissa bits; E5M2 keeps two but reaches further. Which one suits the KV cache?",
    "Once upon a time",
    "KV blocks travel layer by layer over gRPC from the prefill worker to the decode worker, as FP8 with "
    "one scale per token per head, and the decode worker starts as soon as the last layer lands.",
    "ok",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_DISAGG), help="disaggregated serving YAML")
    parser.add_argument("--colocated-config", default=str(DEFAULT_COLOC), help="colocated serving YAML to compare")
    parser.add_argument("--requests", type=int, default=16, help="requests sent to each deployment (default 16)")
    parser.add_argument("--max-tokens", type=int, default=12, help="max_tokens of each request (default 12)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def workload(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """n requests cycling over prompts × {completion, chat} × {stream, not} (deterministic)."""
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        chat = (i // 2) % 2 == 1
        body: dict[str, Any] = {"max_tokens": max_tokens - (i % 3), "temperature": 0, "stream": i % 2 == 1}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        out.append({"chat": chat, "body": body})
    return out


def send(base_url: str, model: str, item: dict[str, Any]) -> dict[str, Any]:
    """One request over HTTP; returns token ids, text, finish reason and client-side TTFT."""
    import httpx

    url = base_url + ("/v1/chat/completions" if item["chat"] else "/v1/completions")
    body = {**item["body"], "model": model}
    t0 = time.perf_counter()
    ids: list[int] = []
    text: list[str] = []
    ttft = None
    finish = None
    if body["stream"]:
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read().decode()[:300]}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                ch = chunk["choices"][0]
                if ch.get("token_ids") and ttft is None:
                    ttft = time.perf_counter() - t0
                ids += ch.get("token_ids") or []
                text.append(ch["delta"].get("content") or "" if item["chat"] else ch["text"])
                finish = ch.get("finish_reason") or finish
    else:
        r = httpx.post(url, json=body, timeout=120)
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
        ch = r.json()["choices"][0]
        ids = ch["token_ids"]
        text.append(ch["message"]["content"] if item["chat"] else ch["text"])
        finish = ch["finish_reason"]
    return {"token_ids": ids, "text": "".join(text), "finish_reason": finish, "ttft_s": ttft,
            "e2e_s": time.perf_counter() - t0}


def _pcts(xs: list[float]) -> dict[str, float | None]:
    from orchestrator.runtime.stream import percentile

    return {f"p{p}": (None if (v := percentile(xs, p)) is None else round(v * 1e3, 2)) for p in (50, 90, 99)}


def _kv_bytes(svc: Any) -> float:
    total = 0.0
    for fam in svc.metrics.kv_transfer_bytes.collect():
        for s in fam.samples:
            if s.name.endswith("_total"):
                total += s.value
    return total


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, load_config
    from orchestrator.runtime.ray_local import init_local_ray
    from orchestrator.runtime.service import Service

    t_start = time.perf_counter()
    try:
        configs = {"disaggregated": load_config(args.config), "colocated": load_config(args.colocated_config)}
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.requests < 1:
        print("--requests must be >= 1", file=sys.stderr)
        return 2
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    import ray

    say("starting Ray on 127.0.0.1 and the workers of both deployments ...")
    own_ray = not ray.is_initialized()  # a caller's Ray (tests) is left running
    init_local_ray(num_cpus=8)
    services: dict[str, Service] = {}
    errors: list[str] = []

    def start(name: str) -> None:
        try:
            services[name] = Service(configs[name], name=name, port=0).start()
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=start, args=(n,)) for n in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report: dict[str, Any] = {"ok": False, "requests": args.requests}
    try:
        if errors:
            report["errors"] = errors
            return _finish(report, args, say, 1)
        t_ready = time.perf_counter()
        say(f"ready in {t_ready - t_start:.1f} s: " + ", ".join(f"{n} at {s.base_url}/v1" for n, s in services.items()))
        items = workload(args.requests, args.max_tokens)
        results: dict[str, list[dict[str, Any]]] = {}
        for name, svc in services.items():
            model = svc.config.served_model_name
            with ThreadPoolExecutor(args.concurrency) as ex:
                results[name] = list(ex.map(lambda it, u=svc.base_url, m=model: send(u, m, it), items))
        mismatches = []
        failed = []
        for i, (a, b) in enumerate(zip(results["disaggregated"], results["colocated"], strict=True)):
            for name, r in (("disaggregated", a), ("colocated", b)):
                if "error" in r:
                    failed.append(f"request {i} on {name}: {r['error']}")
            if "error" not in a and "error" not in b and a["token_ids"] != b["token_ids"]:
                mismatches.append({"request": i, "disaggregated": a["token_ids"], "colocated": b["token_ids"]})
        leaks = {name: svc.check_leaks() for name, svc in services.items()}
        report.update({
            "identical_outputs": not mismatches and not failed, "mismatches": mismatches, "failed": failed,
            "leaks": {k: v for k, v in leaks.items() if v},
            "deployments": {
                name: {
                    "ttft_ms": _pcts(svc.dispatcher.ttft_s), "tpot_ms": _pcts(svc.dispatcher.tpot_s),
                    "decisions": svc.dispatcher.counters.as_dict(), "kv_bytes_transferred": int(_kv_bytes(svc)),
                    "tokens_generated": sum(len(r.get("token_ids", [])) for r in results[name]),
                } for name, svc in services.items() if svc.dispatcher is not None
            },
            "workload_s": round(time.perf_counter() - t_ready, 2),
        })
        report["ok"] = not mismatches and not failed and not report["leaks"]
        if mismatches:
            say(f"MISMATCH on {len(mismatches)} request(s): {mismatches[:3]}")
        for f in failed[:5]:
            say(f"FAILED {f}")
        return _finish(report, args, say, 0 if report["ok"] else 1)
    finally:
        for svc in services.values():
            svc.stop(10)
        if own_ray:
            ray.shutdown()
        report["total_s"] = round(time.perf_counter() - t_start, 2)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print(f"done in {report['total_s']} s: {'OK' if report['ok'] else 'FAILED'}", flush=True)


def _finish(report: dict[str, Any], args: argparse.Namespace, say: Any, code: int) -> int:
    if args.json:
        return code
    for e in report.get("errors", []):
        say(f"error: {e}")
    deps = report.get("deployments", {})
    if deps:
        say("")
        say(f"{'deployment':<15}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'TPOT p50':>10}{'p99':>9}{'KV bytes':>11}"
            f"{'tokens':>8}   decisions by reason")
        for name, d in deps.items():
            t, p = d["ttft_ms"], d["tpot_ms"]

            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.1f}"

            reasons = ", ".join(f"{k}={v}" for k, v in d["decisions"]["routes"].items())
            say(f"{name:<15}{f(t['p50']):>10}{f(t['p90']):>9}{f(t['p99']):>9}{f(p['p50']):>10}{f(p['p99']):>9}"
                f"{d['kv_bytes_transferred']:>11}{d['tokens_generated']:>8}   {reasons}")
        say("(TTFT and TPOT in ms, measured at the dispatcher)")
        say(f"outputs identical token for token: {report['identical_outputs']}; "
            f"leaked KV: {report['leaks'] or 'none'}")
    return code

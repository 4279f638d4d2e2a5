"""The printed table of `tandem bench kv-transfer` (workers/kv_transfer/bench.py builds the rows)."""

from __future__ import annotations

from typing import Any


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'shape':<20} {'tokens':>6} {'kv':>9} {'transport':>9} {'str':>3} {'MiB':>8} {'B/tok':>7} "
            f"{'KV GB/s':>7} {'raw GB/s':>8} {'ratio':>5} {'paired':>6} {'bare':>5} {'hidden':>6}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        hidden = f"{100 * r['hidden_fraction']:.0f}%" if "hidden_fraction" in r else "-"
        lines.append(
            f"{r['model_shape']:<20} {r['tokens']:>6} {r['kv_dtype']:>9} {r['transport']:>9} {r['streams']:>3} "
            f"{r['bytes'] / 2**20:>8.1f} {r['bytes_per_token']:>7} {r['kv_gbps']:>7.2f} {r['raw_tcp_gbps']:>8.2f} "
            f"{r['kv_over_raw']:>5.2f} {r['kv_over_raw_paired']:>6.2f} {r.get('bare_grpc_over_raw', float('nan')):>5.2f} "
            f"{hidden:>6}"
        )
    lines.append("ratio = raw / KV medians; paired = median of each repeat's raw/KV (run back to back); "
                 "bare = bare gRPC / raw")
    by = {(r["tokens"], r["kv_dtype"]): r["bytes_per_token"] for r in result["rows"]}
    for n in sorted({r["tokens"] for r in result["rows"]}):
        if (n, "bf16") in by and (n, "fp8_e4m3") in by:
            lines.append(f"fp8_e4m3 moves {by[(n, 'fp8_e4m3')] / by[(n, 'bf16')]:.3f}x the bytes of bf16 "
                         f"(scales included) at {n} tokens")
    for r in result["rows"]:
        bare = (f", bare gRPC {r['bare_grpc_sender_cpu_s_per_gb']:.2f}/{r['bare_grpc_receiver_cpu_s_per_gb']:.2f}"
                if "bare_grpc_receiver_cpu_s_per_gb" in r else "")
        lines.append(
            f"cpu s/GB {r['tokens']:>6} {r['kv_dtype']:>9} (sender/receiver): KV {r['transport']} "
            f"{r['kv_sender_cpu_s_per_gb']:.2f}/{r['kv_receiver_cpu_s_per_gb']:.2f}{bare}, raw TCP "
            f"{r['raw_tcp_sender_cpu_s_per_gb']:.2f}/{r['raw_tcp_receiver_cpu_s_per_gb']:.2f}"
        )
    lines.append("bare = a raw-bytes gRPC stream of the same frames with no per-byte work at either end")
    for r in result["rows"]:
        if "kv_over_raw_same_conns" in r:
            lines.append(
                f"same sockets {r['tokens']:>6} {r['kv_dtype']:>9} {r['transport']:>7}: raw TCP over as many "
                f"sockets {r['raw_tcp_same_conns_gbps']:.2f} GB/s; KV/raw {r['kv_over_raw_same_conns']:.2f} "
                f"(paired {r['kv_over_raw_same_conns_paired']:.2f})")
    seen = set()
    for r in result["rows"]:
        if (r["tokens"], r["kv_dtype"]) in seen:
            continue
        seen.add((r["tokens"], r["kv_dtype"]))
        lines.append(
            f"stages {r['tokens']:>6} {r['kv_dtype']:>9}: framing {r['frame_gbps']:.2f} GB/s, receive+verify "
            f"{r['receive_gbps']:.2f} GB/s ({r['receive_no_value_checks_gbps']:.2f} without value checks; one thread "
            f"each, in-process); bare gRPC {r.get('bare_grpc_gbps', float('nan')):.2f} GB/s across processes"
        )
    for r in result["rows"]:
        if "hidden_fraction" in r:
            lines.append(
                f"overlap {r['tokens']:>6} {r['kv_dtype']:>9} {r['transport']}: compute {r['layer_compute_ms']:.1f} "
                f"ms/layer, send-after-prefill exposes {1e3 * r['exposed_transfer_serial_s']:.0f} ms, layer "
                f"streaming {1e3 * r['exposed_transfer_streamed_s']:.0f} ms -> {100 * r['hidden_fraction']:.0f}% hidden"
            )
    return "\n".join(lines)

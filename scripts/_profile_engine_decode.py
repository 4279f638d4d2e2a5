"""Dev tool (GPU): per-kernel GPU time of one decode-step graph replay, engine vs kernels' bench stack.

python scripts/_profile_engine_decode.py [--batch 64] [--ctx 2048] [--mode fp8|bf16]
Prints the kernels of 5 replays (torch.profiler, CUDA activity) per step, for workers.engine.Engine and for
workers.kernels.bench_stack.Stack at the same shape, so that a gap between the two can be attributed.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _bench_engine_real import build_engine, fill_kv_random, place_running  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def _report(title: str, replay, reps: int = 5) -> None:  # type: ignore[no-untyped-def]
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / reps / 1e3, e.count / reps, e.key[:90]))
    rows.sort(reverse=True)
    print(f"\n== {title}: {sum(r[0] for r in rows):.3f} ms of kernels per step ==")
    for ms, n, key in rows[:14]:
        print(f"{ms:8.3f} ms  {n:6.1f}x  {key}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--mode", default="fp8")
    a = ap.parse_args()
    eng = build_engine(a.mode, None, a.batch * (a.ctx + 64), a.batch, a.ctx + 64)
    fill_kv_random(eng)
    ids = place_running(eng, a.batch, a.ctx, 20, seed=1)
    for _ in range(3):
        eng.step()
    g = eng._graphs
    assert g is not None and g._table_key is not None
    _, b, w = g._table_key
    graph = g.graphs[(b, w)][0]
    _report(f"engine {a.mode} B={a.batch} ctx={a.ctx} (table width {w})", graph.replay)
    for rid in ids:
        eng.abort(rid)
    del eng, g, graph
    gc.collect()
    torch.cuda.empty_cache()
    from workers.kernels.bench_stack import Shape, Stack

    fp8 = a.mode == "fp8"
    stack = Stack(Shape(), fp8=fp8, kv_fp8=fp8, max_tokens=a.batch * a.ctx + 64, distinct_kv_layers=32)
    dev, bs, ctx, batch = "cuda", stack.bs, a.ctx, a.batch
    nb = -(-ctx // bs)
    table = torch.arange(batch * nb, device=dev, dtype=torch.int32).reshape(batch, nb)
    meta = dict(block_table=table, seq_lens=torch.full((batch,), ctx, device=dev, dtype=torch.int32), max_seq_len=ctx)
    tokens = torch.randint(0, stack.s.vocab, (batch,), device=dev)
    pos = torch.full((batch,), ctx - 1, device=dev)
    slots = table[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    stack.forward(tokens, pos, slots, meta)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stack.forward(tokens, pos, slots, meta)
    torch.cuda.current_stream().wait_stream(side)
    sgraph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(sgraph):
        stack.forward(tokens, pos, slots, meta)
    _report(f"stack {a.mode} B={batch} ctx={ctx}", sgraph.replay)
    return 0


if __name__ == "__main__":
    sys.exit(main())

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Probe: how much of decode attention at small batch is the merge kernel (split kernel alone vs split + merge)?

The merge is a second dependent launch; session 5 measured ~2.5 µs per dependent launch on the thin GEMM
(thin_gluon.py). If split-only is ≥ 2.5 µs below split + merge at B=1, 8K, a merge done by the last split program
of each KV head is worth building; if not, the split kernel itself is what holds B=1.
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import workers.kernels.attention as A
from workers.kernels.bench_suite import _attn_case
from workers.kernels.benchmarking import rotating, time_graph_ms

sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import save

F8 = torch.float8_e4m3fn


def main() -> None:
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B, ctx in ((1, 8192), (1, 2048), (4, 8192), (16, 8192)):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        res = {}
        for name, dtype in (("fp8", F8), ("bf16", torch.bfloat16)):
            per_tok = Hkv * D * 2 * dtype.itemsize + (Hkv * 8 if name == "fp8" else 0)
            get = rotating(lambda dtype=dtype, B=B, ctx=ctx: _attn_case(B, ctx, dtype), B * ctx * per_tok)
            real_merge = A._attn_merge_kernel
            for mode in ("full", "split_only"):
                def run(get=get, q=q, lens=lens, ctx=ctx):
                    kc, vc, ks, vs, table = get()
                    return A.paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx)

                class _Skip:
                    def __getitem__(self, grid):
                        return lambda *a, **k: None
                A._attn_merge_kernel = _Skip() if mode == "split_only" else real_merge
                try:
                    us = min(time_graph_ms(run, calls=max(get.n, 8), rep_ms=20) for _ in range(3)) * 1e3
                finally:
                    A._attn_merge_kernel = real_merge
                res[(name, mode)] = us
                rows.append(dict(kv=name, B=B, ctx=ctx, mode=mode, us=us))
            del get
        print(f"B={B} ctx={ctx}: fp8 full {res[('fp8', 'full')]:.2f} split-only {res[('fp8', 'split_only')]:.2f} | "
              f"bf16 full {res[('bf16', 'full')]:.2f} split-only {res[('bf16', 'split_only')]:.2f}", flush=True)
    save("attn_merge_share.json", rows)


if __name__ == "__main__":
    main()

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the FP8 decode-attention kernel at B=1 with a register cap (more one-warp programs per SM).

Nsight Compute at B=1, 8K (`attn_ncu_case.py`, ATTN_B=1 ATTN_CTX=8192; h100-ncu-attention-b1-8k-{fp8,bf16}-session5-2026-11-22.txt):
1,024 one-warp programs at 255 registers, 8 per SM (12.5% occupancy), ~2 warps per scheduler, an instruction every
5 cycles, no eligible warp 62% of the time, DRAM 35%. Prediction: a cap of 128-168 registers (12-16 programs per
SM) with 256 splits keeps more warps per scheduler and gains if the kernel does not spill much.
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from workers.kernels.attention import paged_decode_attention
from workers.kernels.bench_suite import _attn_case
from workers.kernels.benchmarking import rotating, time_graph_ms
from workers.kernels.reference import paged_decode_attention_ref

sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import save

F8 = torch.float8_e4m3fn


def main() -> None:
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B, ctx in ((1, 8192), (4, 8192), (64, 2048)):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        per_tok = Hkv * D * 2 + Hkv * 8
        get = rotating(lambda B=B, ctx=ctx: _attn_case(B, ctx, F8), B * ctx * per_tok)
        kc0, vc0, ks0, vs0, t0 = get._sets[0]
        ref = paged_decode_attention_ref(q, kc0, vc0, t0, lens, D**-0.5, ks0, vs0).float() if B <= 4 else None
        splits_opts = (None, 256) if B == 1 else (None,)
        for (bt, warps), regs, splits in itertools.product(((32, 1), (16, 1), (64, 2)), (None, 192, 168, 128),
                                                          splits_opts):
            def run(get=get, q=q, lens=lens, ctx=ctx, bt=bt, warps=warps, regs=regs, splits=splits):
                kc, vc, ks, vs, table = get()
                return paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx,
                                              num_splits=splits, block_t=bt, num_warps=warps, num_stages=2,
                                              max_regs=regs)
            try:
                err = None
                if ref is not None:
                    out = paged_decode_attention(q, kc0, vc0, t0, lens, D**-0.5, ks0, vs0, max_seq_len=ctx,
                                                 num_splits=splits, block_t=bt, num_warps=warps, num_stages=2,
                                                 max_regs=regs).float()
                    err = float((out - ref).norm() / ref.norm())
                us = min(time_graph_ms(run, calls=max(get.n, 8), rep_ms=20) for _ in range(3)) * 1e3
            except Exception as e:
                print("fail", B, ctx, bt, warps, regs, splits, type(e).__name__, str(e)[:200], flush=True)
                continue
            rows.append(dict(B=B, ctx=ctx, block_t=bt, warps=warps, max_regs=regs, splits=splits, us=us, err=err))
            print(f"B={B} ctx={ctx} bt={bt} warps={warps} regs={regs} splits={splits}: {us:.2f} us err={err}",
                  flush=True)
        del get
    save("attn_b1_regs.json", rows)


if __name__ == "__main__":
    main()

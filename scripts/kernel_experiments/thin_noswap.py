# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: a thin FP8 GEMM WITHOUT swap-AB (tokens on the MMA's M side, padded to 64; weights on its N side,
which wgmma allows down to 8), so narrow weight tiles give 128-512 programs; TMA tiles, PDL."""
import itertools

import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save, sweep, tma_runner


@triton.jit
def thin_tma(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        x = x_desc.load([m0, k])  # [BLOCK_M, BLOCK_K]
        w = w_desc.load([n0, k])  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    out = acc * x_sc[:, None] * w_sc[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def main():
    rows = []
    for N, K in LLAMA8B:
        for M in (1, 16, 64):
            case = ThinCase(N, K, M)
            variants = [(dict(bm=64, bn=bn, bk=bk, stages=st, warps=4), tma_runner(thin_tma, 64, bn, bk, st, 4, True))
                        for bn, bk, st in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6, 8))
                        if (bn + 64) * bk * st <= 220 * 1024]
            sweep(case, variants, "no-swap", rows)
    save("thin_noswap.json", rows)


if __name__ == "__main__":
    main()

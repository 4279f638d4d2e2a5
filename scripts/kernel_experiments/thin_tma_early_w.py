# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the TMA thin GEMM with its first weight tile fetched BEFORE gdc_wait (weights are constants, so
they may be read while the previous kernel still runs), vs the adopted kernel."""
import itertools

import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save, sweep, tma_runner


@triton.jit
def thin_tma(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    tl.extra.cuda.gdc_launch_dependents()
    w0 = w_desc.load([n0, 0])
    tl.extra.cuda.gdc_wait()
    x0 = x_desc.load([m0, 0])
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc = tl.dot(w0, tl.trans(x0), acc)
    for k in tl.range(BLOCK_K, K, BLOCK_K):
        w = w_desc.load([n0, k])
        x = x_desc.load([m0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    nmask = offs_n < N
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


def main():
    rows = []
    for N, K in LLAMA8B:
        for M in (1, 16, 64):
            case = ThinCase(N, K, M)
            bm = max(16, triton.next_power_of_2(M))
            variants = [(dict(bm=bm, bn=64, bk=bk, stages=st, warps=4), tma_runner(thin_tma, bm, 64, bk, st, 4, True))
                        for bk, st in itertools.product((128, 256), (3, 4, 6))]
            sweep(case, variants, "early-W", rows)
    save("thin_tma_early_w.json", rows)


if __name__ == "__main__":
    main()

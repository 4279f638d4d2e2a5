# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""A/B: the thin GEMMs with their scale loads before the K loop (adopted in session 5) vs after it (verbatim copies
of the kernels before the change, below), interleaved in one run, timed with 16 and with 64 calls per CUDA graph.

The per-program timeline (thin_timeline.py) showed the epilogue's scale loads exposing ~0.5 µs per call. The two
graph lengths show how much of a short kernel's figure is the graph's own start (amortized over the calls).
"""
import os
import statistics
import sys

import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import LLAMA8B, ThinCase, save

import workers.kernels.gemm as G
from workers.kernels.benchmarking import time_graph_ms


@triton.jit
def old_thin_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
    k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched early (PDL): let the next kernel launch, then wait for the producer of x
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    wn = offs_n % N
    mmask = offs_m < M
    k_start = pid_k * k_per_split
    w_ptrs = w_ptr + wn[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        else:
            kk = k_start + k + offs_k
            kmask = (kk < K) & (k + offs_k < k_per_split)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=kmask[:, None] & mmask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    cmask = (offs_n[:, None] < N) & mmask[None, :]
    if not PARTIAL:
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        w_sc = tl.load(ws_ptr + wn)
        out = acc * w_sc[:, None] * x_sc[None, :]
        tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None],
                 out.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        # partials: [SPLIT_K, M, N] float32
        base = part_ptr + pid_k.to(tl.int64) * M * N
        tl.store(base + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc, mask=cmask)


@triton.jit
def old_thin_tma_kernel(
    x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """The thin GEMM with its tiles fetched by TMA (one thread issues each bulk copy; rows past M and columns
    past K arrive as zeros). No split-K. Measured faster than pointer loads at M = 33..64 (configs.py)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        w = w_desc.load([n0, k])  # [BLOCK_N, BLOCK_K]
        x = x_desc.load([m0, k])  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, tl.trans(x), acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


NEW = (G._thin_kernel, G._thin_tma_kernel)
OLD = (old_thin_kernel, old_thin_tma_kernel)


def use(kernels) -> None:
    G._thin_kernel, G._thin_tma_kernel = kernels


def main() -> None:
    rows = []
    for N, K in LLAMA8B:
        for M in (1, 16, 32, 64):
            case = ThinCase(N, K, M)
            res = {}
            for name, kernels in (("old", OLD), ("new", NEW)):
                use(kernels)
                res[(name, "err")] = case.error(lambda *a: a[4].copy_(G.thin_gemm(*a[:4])))
            use(NEW)
            for calls in (16, 64):
                for _ in range(3):
                    for name, kernels in (("old", OLD), ("new", NEW)):
                        use(kernels)
                        us = time_graph_ms(lambda case=case: G.thin_gemm(*case.rot()[:4]), calls=calls, rep_ms=20) * 1e3
                        res.setdefault((name, calls), []).append(us)
            use(NEW)
            r = dict(N=N, K=K, M=M, err_old=res[("old", "err")], err_new=res[("new", "err")])
            for name in ("old", "new"):
                for calls in (16, 64):
                    r[f"{name}_us_calls{calls}"] = statistics.median(res[(name, calls)])
                    r[f"{name}_runs_calls{calls}"] = res[(name, calls)]
            rows.append(r)
            fl = 2 * M * N * K / 1e6
            print(f"N={N} K={K} M={M}: calls=16 old {r['old_us_calls16']:.2f} new {r['new_us_calls16']:.2f} "
                  f"({fl / r['new_us_calls16']:.0f} TF) | calls=64 old {r['old_us_calls64']:.2f} "
                  f"new {r['new_us_calls64']:.2f} ({fl / r['new_us_calls64']:.0f} TF) | err {r['err_new']:.2g}",
                  flush=True)
    save("thin_scales_ab.json", rows)


if __name__ == "__main__":
    main()

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment (a bound): is the activation tile's traffic what makes the thin GEMM stream slower at M=64 than at M=16?

With swap-AB every program reads all of x from L2 each call (down, M=64: 64 programs x 917 KB = 58.7 MB beside
58.7 MB of weight). The adopted TMA kernel, copied, with X_ONCE: x's first K tile is loaded once before the loop
and reused for every K step (wrong products — a bound, not a kernel), so the loop moves only the weight. If M=64
with X_ONCE runs near M=16's time, x traffic is the limit at M >= 48 (and multicast of x across a cluster the
lever); if it stays near M=64's, the MMA work or the weight stream is.
"""
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import LLAMA8B, ThinCase, save

from workers.kernels import configs


@triton.jit
def thin_tma_x(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_ONCE: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if X_ONCE:
        x0 = x_desc.load([m0, 0])
        for k in tl.range(0, K, BLOCK_K):
            w = w_desc.load([n0, k])
            acc = tl.dot(w, tl.trans(x0), acc)
    else:
        for k in tl.range(0, K, BLOCK_K):
            w = w_desc.load([n0, k])
            x = x_desc.load([m0, k])
            acc = tl.dot(w, tl.trans(x), acc)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


def runner(cfg, x_once: bool):
    def run(x, xs, w, ws, out):
        M, K = x.shape
        N = w.shape[0]
        xd = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        wd = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
        thin_tma_x[(triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))](
            xd, xs, wd, ws, out, M, N, K, out.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, X_ONCE=x_once, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=True)
    return run


def main() -> None:
    rows = []
    for N, K in LLAMA8B:
        for M in (16, 64):
            case = ThinCase(N, K, M)
            cfg = configs.replace(configs.thin_config(64, N, K), block_m=max(16, triton.next_power_of_2(M)), tma=True)
            res = {}
            for x_once in (False, True):
                res[x_once] = min(case.time_us(runner(cfg, x_once), rep_ms=20) for _ in range(3))
                rows.append(case.row(res[x_once], x_once=x_once, cfg=cfg.__dict__))
            print(f"N={N} K={K} M={M}: adopted {case.current_us:.2f} us; copy {res[False]:.2f}; x loaded once "
                  f"{res[True]:.2f} ({N * K / res[True] / 1e6:.2f} TB/s)", flush=True)
    torch.cuda.synchronize()
    save("thin_x_traffic.json", rows)


if __name__ == "__main__":
    main()

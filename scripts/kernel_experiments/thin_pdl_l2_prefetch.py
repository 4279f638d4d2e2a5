# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: programmatic dependent launch (PDL) + L2 weight prefetch for the thin FP8 GEMM."""
import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save

from workers.kernels import configs
from workers.kernels.benchmarking import Rotation, time_graph_ms


@triton.jit
def _prefetch_l2(w_ptr, rows, stride_wn, k0, nbytes, NROWS: tl.constexpr):
    ptrs = w_ptr + rows.to(tl.int64) * stride_wn + k0
    nb = tl.full([NROWS], nbytes, tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                              [ptrs, nb], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def thin_pdl(x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_cm, k_per_split,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
             PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    wn = offs_n % N
    mmask = offs_m < M
    k_start = pid_k * k_per_split
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH:
            _prefetch_l2(w_ptr, wn, stride_wn, k_start, k_per_split, BLOCK_N)
        tl.extra.cuda.gdc_wait()
    w_ptrs = w_ptr + wn[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_start + offs_k)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _k in range(0, k_per_split, BLOCK_K):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    cmask = (offs_n[:, None] < N) & mmask[None, :]
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + wn)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty), mask=cmask)


def run_thin(x, xs, w, ws, out, cfg, pdl, prefetch):
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(N, cfg.block_n), 1, triton.cdiv(M, cfg.block_m))
    kw = dict(launch_pdl=True) if pdl else {}
    thin_pdl[grid](x, xs, w, ws, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), K,
                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=pdl, PREFETCH=prefetch,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)


@triton.jit
def read_k(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK * ITERS
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_ceiling(nbytes, pdl):
    n = nbytes // 4
    block = 2048
    iters = max(1, -(-n // (block * 4 * 132)))
    grid = -(-n // (block * iters))
    rot = Rotation(lambda: (torch.randint(0, 100, (n,), device="cuda", dtype=torch.int32),), nbytes)
    out = torch.empty(grid, device="cuda", dtype=torch.int32)
    kw = dict(launch_pdl=True) if pdl else {}
    def run():
        read_k[(grid,)](rot()[0], out, n, BLOCK=block, ITERS=iters, PDL=pdl, num_warps=8, **kw)
    return nbytes / time_graph_ms(run, calls=max(rot.n, 8)) / 1e9


def main():
    rows = []
    for N, K in LLAMA8B:
        ceil = {p: read_ceiling(N * K, p) for p in (False, True)}
        for M in (1, 16, 32, 64):
            cfg = configs.replace(configs.thin_config(M, N, K), split_k=1, tma=False)
            case = ThinCase(N, K, M)
            row = dict(N=N, K=K, M=M, ceil_TBps=ceil[False], ceil_pdl_TBps=ceil[True])
            for name, pdl, pf in (("base", False, False), ("pdl", True, False), ("pdl_pf", True, True)):
                def run(*a, cfg=cfg, pdl=pdl, pf=pf):
                    run_thin(*a, cfg, pdl, pf)
                row[name + "_err"] = case.error(run)
                us = case.time_us(run)
                row[name + "_us"], row[name + "_TBps"] = us, N * K / us / 1e6
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    save("pdl_exp.json", rows)


if __name__ == "__main__":
    main()

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: thin FP8 GEMM with in-kernel (serial) split-K reduction + PDL."""
import itertools

import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save, sweep


@triton.jit
def thin_sk(x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
            k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    wn = offs_n % N
    mmask = offs_m < M
    k_start = pid_k * k_per_split
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
    c_offs = offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    if SPLIT_K == 1:
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        w_sc = tl.load(ws_ptr + wn)
        tl.store(c_ptr + c_offs, (acc * w_sc[:, None] * x_sc[None, :]).to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        p_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + p_offs, acc, mask=cmask)
        tile = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            tot = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tot += tl.load(part_ptr + s * M * N + p_offs, mask=cmask, other=0.0, cache_modifier=".cg")
            x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
            w_sc = tl.load(ws_ptr + wn)
            tl.store(c_ptr + c_offs, (tot * w_sc[:, None] * x_sc[None, :]).to(c_ptr.dtype.element_ty), mask=cmask)
            tl.store(cnt_ptr + tile, 0)


CNT = {}


def run_sk(x, xs, w, ws, out, part, bm, bn, bk, split, stages, pdl):
    M, K = x.shape
    N = w.shape[0]
    kps = triton.cdiv(triton.cdiv(K, split), bk) * bk
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    key = grid[0] * grid[2]
    if key not in CNT:
        CNT[key] = torch.zeros(key, dtype=torch.int32, device="cuda")
    kw = dict(launch_pdl=True) if pdl else {}
    thin_sk[grid](x, xs, w, ws, out, part, CNT[key], M, N, K, x.stride(0), w.stride(0), out.stride(0), kps,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, PDL=pdl, num_warps=4, num_stages=stages, **kw)


def main():
    rows = []
    for N, K in LLAMA8B:
        for M in (1, 16, 32, 64):
            case = ThinCase(N, K, M)
            bm = max(16, triton.next_power_of_2(M))
            variants = []
            for split, bk, stages, pdl in itertools.product((1, 2, 4) if N <= 8192 else (1, 2), (128, 256), (4, 6),
                                                            (False, True)):
                if K % (split * bk) == 0:
                    part = torch.empty(split, M, N, device="cuda", dtype=torch.float32)
                    variants.append((dict(split=split, bk=bk, stages=stages, pdl=pdl),
                                     lambda *a, p=part, m=bm, s=split, k=bk, st=stages, d=pdl: run_sk(*a, p, m, 64, k, s, st, d)))
            sweep(case, variants, "split-K", rows)
    save("splitk_exp.json", rows)


if __name__ == "__main__":
    main()

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the TMA thin GEMM with split-K reduced inside the kernel (the last program of a tile sums the
float32 partials; an atomic counter per tile, reset by that program, so CUDA graphs can replay it).

Question: session 3's in-kernel split-K used pointer loads and never won; the TMA kernel adopted later for
M = 33..64 reads both a [64, BLOCK_K] weight tile and a [64, BLOCK_K] x tile per step, so each of its 64 busy SMs
takes in 512 KB for (4096, 4096). Split 2–4 spreads that over 128–256 programs (all SMs), halving or quartering
what one SM must take in, at the price of 1–2 MB of partials. Prediction: if per-SM intake is what holds M=64
0.4 µs above M=16, split 2 gains ~0.3 µs there; else nothing.
"""
import itertools

import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save, sweep
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def thin_tma_sk(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, part_ptr, cnt_ptr, M, N, K, stride_cm, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    m0 = tl.program_id(2) * BLOCK_M
    k0 = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(k0, k0 + k_per_split, BLOCK_K):
        w = w_desc.load([n0, k])
        x = x_desc.load([m0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    cmask = nmask[:, None] & mmask[None, :]
    c_offs = offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    if SPLIT_K == 1:
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
        tl.store(c_ptr + c_offs, (acc * w_sc[:, None] * x_sc[None, :]).to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        p_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + p_offs, acc, mask=cmask)
        tile = tl.program_id(2) * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            tot = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tot += tl.load(part_ptr + s * M * N + p_offs, mask=cmask, other=0.0, cache_modifier=".cg")
            x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
            w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
            tl.store(c_ptr + c_offs, (tot * w_sc[:, None] * x_sc[None, :]).to(c_ptr.dtype.element_ty), mask=cmask)
            tl.store(cnt_ptr + tile, 0)


CNT = {}


def runner(bm, bn, bk, split, stages, M, N):
    part = torch.empty(split, M, N, device="cuda", dtype=torch.float32)

    def run(x, xs, w, ws, out):
        K = x.shape[1]
        kps = K // split
        grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
        key = grid[0] * grid[2]
        if key not in CNT:
            CNT[key] = torch.zeros(key, dtype=torch.int32, device="cuda")
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk])
        thin_tma_sk[grid](xd, xs, wd, ws, out, part, CNT[key], M, N, K, out.stride(0), kps, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, SPLIT_K=split, PDL=True, num_warps=4, num_stages=stages, launch_pdl=True)
    return run


def main():
    rows = []
    for N, K in LLAMA8B:
        for M in (16, 32, 64):
            case = ThinCase(N, K, M)
            bm = max(16, triton.next_power_of_2(M))
            variants = []
            for split, bk, stages in itertools.product((1, 2, 3, 4), (128, 256), (2, 3, 4, 6)):
                if K % (split * bk) or (64 + bm) * bk * stages > 220 * 1024 or K // (split * bk) < 2:
                    continue
                variants.append((dict(split=split, bm=bm, bk=bk, stages=stages), runner(bm, 64, bk, split, stages, M, N)))
            sweep(case, variants, "TMA split-K", rows)
    save("thin_tma_splitk.json", rows)


if __name__ == "__main__":
    main()

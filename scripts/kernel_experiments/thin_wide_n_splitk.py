# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: down (N=4096, K=14336) at M = 16/48/64 with 128- and 256-row weight tiles and split-K (session 6).

Hypothesis from session 5: each of the 64 programs (64-row weight tiles) reads all of x from L2, so at M=64 the
L2-to-SM traffic is the 58.7 MB weight plus 64 × 917 KB of x — twice what M=16 moves — and down streams 2.52 TB/s
at M=64 against 2.70 at M=16. Split-K does not change that traffic (each of the N/BN tile columns still reads x
once), wider tiles do: BN=128 with split 2 keeps 64 programs and halves x's traffic, BN=256 with split 4 quarters
it. The partial sums are reduced inside the kernel by the last-arriving program of each tile
(thin_tma_splitk.thin_tma_sk). Prediction: if x's traffic is what holds M ≥ 48, BN=128 split 2 beats the adopted
config at M=64 by 3-6%; at M=16 it should not.
"""
import itertools
import os

import torch
import triton
from _harness import ThinCase, save, sweep
from thin_tma_splitk import CNT, thin_tma_sk
from triton.tools.tensor_descriptor import TensorDescriptor


def runner(bm, bn, bk, split, stages, warps, M, N):
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
        thin_tma_sk[grid](xd, xs, wd, ws, out, part, CNT[key], M, N, K, out.stride(0), kps, BLOCK_M=bm,
                          BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, PDL=True, num_warps=warps, num_stages=stages,
                          launch_pdl=True)
    return run


def main():
    rows = []
    N, K = 4096, 14336
    for M in [int(m) for m in os.environ.get("EXP_MS", "64,16").split(",")]:
        case = ThinCase(N, K, M)
        bm = max(16, triton.next_power_of_2(M))
        variants = []
        grid = [(64, 1, bk, st, 4) for bk, st in itertools.product((128, 256), (3, 4, 6))]
        grid += list(itertools.product((128,), (1, 2, 4), (128, 256), (3, 4, 6), (4, 8)))
        grid += list(itertools.product((256,), (2, 4, 7), (128,), (2, 3, 4), (8,)))
        for bn, split, bk, stages, warps in grid:
            if (bn + bm) * bk * stages > 220 * 1024 or K % (split * bk) or K // (split * bk) < 2:
                continue
            variants.append((dict(bn=bn, split=split, bk=bk, stages=stages, warps=warps, programs=N // bn * split),
                             runner(bm, bn, bk, split, stages, warps, M, N)))
        print(f"M={M}: {len(variants)} variants", flush=True)
        sweep(case, variants, "wide-N split-K", rows)
    save(os.environ.get("EXP_NAME", "thin_wide_n_splitk.json"), rows)


if __name__ == "__main__":
    main()

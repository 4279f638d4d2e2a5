# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the thin (swap-AB) FP8 GEMM with TMA descriptor loads (host descriptors) + PDL, vs the pointer kernel.
(The kernel run here is the one adopted from it, workers.kernels.gemm._thin_tma_kernel.)"""
import itertools

import triton
from _harness import LLAMA8B, ThinCase, save, sweep, tma_runner

from workers.kernels.gemm import _thin_tma_kernel


def main():
    rows = []
    for N, K in LLAMA8B:
        for M in (1, 16, 64):
            case = ThinCase(N, K, M)
            bm = max(16, triton.next_power_of_2(M))
            variants = [(dict(bm=bm, bn=bn, bk=bk, stages=st, warps=4), tma_runner(_thin_tma_kernel, bm, bn, bk, st, 4, True))
                        for bn, bk, st in itertools.product((64, 128), (128, 256, 512), (3, 4, 6, 8))
                        if (bn + bm) * bk * st <= 220 * 1024]
            sweep(case, variants, "TMA", rows)
    save("thin_tma.json", rows)


if __name__ == "__main__":
    main()

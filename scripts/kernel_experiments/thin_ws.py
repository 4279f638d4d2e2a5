# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the TMA thin GEMM with Triton's automatic warp specialization (`tl.range(..., warp_specialize=True)`:
a producer warp issuing the TMA copies, consumer warps the wgmma), 4 or 8 warps, vs the adopted kernel.

Question: whether (64, 4096, 4096) is held at 9.1–9.3 µs by the single warpgroup doing both the waits on the
copies and the MMAs. Prediction: if Triton 3.6 emits specialized code for sm_90 (`setmaxnreg` in the PTX), a few
tenths of a µs; if it does not, nothing. `python3 scripts/kernel_experiments/thin_ws.py` also prints whether the
compiled kernel is specialized.

`python3 scripts/kernel_experiments/thin_ws.py ncu` instead runs the adopted kernel at M=64 a few times, for
    ncu --kernel-name regex:thin --launch-skip 5 --launch-count 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats python3 … ncu
"""
import itertools
import sys

import torch
import triton
import triton.language as tl
from _harness import ThinCase, save, sweep, tma_runner

from workers.kernels.gemm import thin_gemm
from workers.kernels.quant import quantize_per_token


@triton.jit
def thin_tma_ws(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=True):
        w = w_desc.load([n0, k])
        x = x_desc.load([m0, k])
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


def ncu_case() -> None:
    F8 = torch.float8_e4m3fn
    w, ws = quantize_per_token(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, F8)
    x, xs = quantize_per_token(torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16), F8)
    for _ in range(8):
        thin_gemm(x, xs, w, ws)
    torch.cuda.synchronize()


def main() -> None:
    rows = []
    for (N, K), M in itertools.product(((4096, 4096), (6144, 4096), (4096, 14336)), (16, 64)):
        case = ThinCase(N, K, M)
        bm = max(16, triton.next_power_of_2(M))
        variants = []
        for bk, st, warps in itertools.product((128, 256), (3, 4, 6), (4, 8)):
            if (64 + bm) * bk * st > 220 * 1024:
                continue
            variants.append((dict(kind="ws", bm=bm, bn=64, bk=bk, stages=st, warps=warps),
                             tma_runner(thin_tma_ws, bm, 64, bk, st, warps, True)))
        best = sweep(case, variants, "TMA warp-specialized", rows)
        if best is not None and not rows[-1].get("ptx_checked"):
            try:
                k = next(iter(thin_tma_ws.device_caches[0][0].values()))
                ptx = k.asm.get("ptx", "")
                rows[-1]["ptx_setmaxnreg"] = "setmaxnreg" in ptx
                rows[-1]["ptx_checked"] = True
                print("specialized (setmaxnreg in PTX):", rows[-1]["ptx_setmaxnreg"], flush=True)
            except Exception as e:  # the cache layout differs between Triton versions
                print("could not read the PTX:", type(e).__name__, e)
    save("thin_ws.json", rows)


if __name__ == "__main__":
    ncu_case() if sys.argv[1:] == ["ncu"] else main()

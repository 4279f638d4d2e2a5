# ruff: noqa: E402, B023  (one-off H100 experiments; run from the repository root; closures used within their iteration)
"""Experiment: session 4's tile-packed weight layout again, on today's thin kernel (session 6).

Session 4 (thin_packed.py, before the scale loads moved ahead of the K loop and before 64-call graphs) measured
down 4.6-5% faster on a weight stored as contiguous [BLOCK_N, BLOCK_K] tiles, within noise elsewhere. Down at
M = 48/64 is the one Llama-8B shape whose thin GEMM streams below 2.6 TB/s while its read ceiling (2.78) is above.
Here: the production TMA kernel copied with one change — the weight tile of (program n, step k) is read from row
(n · K/BK + k/BK) · BN of the packed [N/BN · K/BK · BN, BK] view, a 16 KB contiguous run — against the adopted
kernel, same config (and 4/6/8 stages), interleaved 3×, M = 1..64, all four Llama-8B shapes.
Prediction: down −4 to −5% at every M (M=64: 23.3 → ~22.2 µs = 2.64 TB/s); the others within ±2%.
"""
import os
import statistics

import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save
from triton.tools.tensor_descriptor import TensorDescriptor

from workers.kernels import configs
from workers.kernels.gemm import thin_gemm


@triton.jit
def thin_tma_packed(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    n0 = pid_n * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kt in tl.range(0, k_tiles):
        w = w_desc.load([(pid_n * k_tiles + kt) * BLOCK_N, 0])  # [BLOCK_N, BLOCK_K], contiguous in memory
        x = x_desc.load([m0, kt * BLOCK_K])
        acc = tl.dot(w, tl.trans(x), acc)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


def pack(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    N, K = w.shape
    assert N % bn == 0 and K % bk == 0
    return w.view(N // bn, bn, K // bk, bk).permute(0, 2, 1, 3).contiguous().view(-1, bk)


def main() -> None:
    rows = []
    for N, K in LLAMA8B:
        for M in [int(m) for m in os.environ.get("EXP_MS", "1,16,32,48,64").split(",")]:
            case = ThinCase(N, K, M)
            cfg = configs.thin_config(M, N, K)
            bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
            packed = {id(s[2]): pack(s[2], bn, bk) for s in case.rot._sets}

            def run_packed(x, xs, w, ws, out, stages):
                xd = TensorDescriptor.from_tensor(x, [bm, bk])
                wd = TensorDescriptor.from_tensor(packed[id(w)], [bn, bk])
                thin_tma_packed[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
                    xd, xs, wd, ws, out, M, N, K, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    num_warps=cfg.num_warps, num_stages=stages, launch_pdl=True)

            err = case.error(lambda *a: run_packed(*a, cfg.num_stages))
            stage_opts = sorted({cfg.num_stages, 4, 6, 8})
            stage_opts = [s for s in stage_opts if (bn + bm) * bk * s <= 220 * 1024]
            t = {"adopted": []} | {f"packed_s{s}": [] for s in stage_opts}
            for _ in range(3):
                t["adopted"].append(case.time_us(lambda *a: thin_gemm(*a[:4]), rep_ms=20))
                for s in stage_opts:
                    t[f"packed_s{s}"].append(case.time_us(lambda *a, s=s: run_packed(*a, s), rep_ms=20))
            med = {k: statistics.median(v) for k, v in t.items()}
            best_key = min((k for k in med if k != "adopted"), key=med.get)
            r = case.row(med[best_key], cfg=cfg.__dict__, err=err, adopted_us=med["adopted"], best=best_key,
                         all_us=t, adopted_TBps=N * K / med["adopted"] / 1e6)
            rows.append(r)
            print(f"N={N} K={K} M={M} ({cfg.num_stages} st, tma={cfg.tma}): adopted {med['adopted']:.2f} us "
                  f"({r['adopted_TBps']:.2f} TB/s); packed {best_key} {med[best_key]:.2f} us ({r['TBps']:.2f} TB/s, "
                  f"{med[best_key] / med['adopted'] - 1:+.1%}) err={err:.2g}", flush=True)
    save(os.environ.get("EXP_NAME", "thin_packed_current.json"), rows)


if __name__ == "__main__":
    main()

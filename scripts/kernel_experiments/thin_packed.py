# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: the thin FP8 GEMM reading a tile-packed weight.

Question: a row-major [N, K] weight makes each program of the thin GEMM read BLOCK_N rows of BLOCK_K bytes per
step — at any moment the 64 programs of (4096, 4096) touch 4096 rows 4 KB apart, 256 B from each — while the
bare read kernel (the "read ceiling") streams contiguous bytes. If DRAM locality is what separates the GEMM
from that ceiling (9.1 vs 7.7 µs at M=64), storing the weight once, at load time, as contiguous
[BLOCK_N, BLOCK_K] tiles in the order a program walks them (tile (n, k) at rows (n·KT + k)·BLOCK_N of a
[NT·KT·BLOCK_N, BLOCK_K] matrix) makes every program's stream one contiguous run and every TMA box one
contiguous 16 KB block. Prediction: ≥ 0.5 µs off (4096, 4096); if the layout is not the limit, nothing.

Also measured beside it: the read ceiling with and without PDL and a device copy of the same bytes, so that
the ceiling has more than one witness.
"""
import itertools

import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save, sweep, tma_runner
from thin_pdl_l2_prefetch import read_ceiling
from triton.tools.tensor_descriptor import TensorDescriptor

from workers.kernels.benchmarking import Rotation, time_graph_ms
from workers.kernels.gemm import _thin_tma_kernel


def pack(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    N, K = w.shape
    return w.view(N // bn, bn, K // bk, bk).permute(0, 2, 1, 3).contiguous().view(-1, bk)


@triton.jit
def thin_tma_packed(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    n0 = pid_n * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    kt_n = K // BLOCK_K
    row0 = pid_n * kt_n * BLOCK_N
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kt in tl.range(0, kt_n):
        w = w_desc.load([row0 + kt * BLOCK_N, 0])
        x = x_desc.load([m0, kt * BLOCK_K])
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


@triton.jit
def thin_ptr_packed(x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_xm, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """The pointer thin kernel (swap-AB) on a packed weight: each step's tile is one contiguous block."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    w_ptrs = w_ptr + pid_n.to(tl.int64) * BLOCK_N * K + (tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + offs_k[None, :])
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_N * BLOCK_K
        x_ptrs += BLOCK_K
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=mmask[None, :])


class Packed:
    """The case's weights packed per (bn, bk), found by the row-major weight's address."""

    def __init__(self, case: ThinCase) -> None:
        self.case = case
        self.by = {}

    def get(self, w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
        key = (bn, bk)
        if key not in self.by:
            self.by[key] = {s[2].data_ptr(): pack(s[2], bn, bk) for s in self.case.rot._sets}
        return self.by[key][w.data_ptr()]


def tma_packed_runner(packed: Packed, bm, bn, bk, stages, warps):
    def run(x, xs, w, ws, out):
        M, K = x.shape
        N = w.shape[0]
        wp = packed.get(w, bn, bk)
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(wp, [bn, bk])
        thin_tma_packed[(N // bn, triton.cdiv(M, bm))](xd, xs, wd, ws, out, M, N, K, out.stride(0), BLOCK_M=bm,
                                                       BLOCK_N=bn, BLOCK_K=bk, PDL=True, num_warps=warps,
                                                       num_stages=stages, launch_pdl=True)
    return run


def ptr_packed_runner(packed: Packed, bm, bn, bk, stages, warps):
    def run(x, xs, w, ws, out):
        M, K = x.shape
        N = w.shape[0]
        wp = packed.get(w, bn, bk)
        thin_ptr_packed[(N // bn, triton.cdiv(M, bm))](x, xs, wp, ws, out, M, N, K, x.stride(0), out.stride(0),
                                                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=True,
                                                       num_warps=warps, num_stages=stages, launch_pdl=True)
    return run


def copy_ceiling(nbytes: int) -> float:
    """Read+write TB/s of a device copy of nbytes (graph, rotated)."""
    rot = Rotation(lambda: (torch.empty(nbytes, dtype=torch.uint8, device="cuda"),
                            torch.empty(nbytes, dtype=torch.uint8, device="cuda")), 2 * nbytes)
    def run():
        a, b = rot()
        b.copy_(a)
    return 2 * nbytes / time_graph_ms(run, calls=max(rot.n, 8)) / 1e9


def main():
    rows, ceil_rows = [], []
    for N, K in LLAMA8B:
        nb = N * K
        c = dict(N=N, K=K, MB=nb / 1e6, read_TBps=read_ceiling(nb, False), read_pdl_TBps=read_ceiling(nb, True),
                 copy_rw_TBps=copy_ceiling(nb))
        c["read_pdl_us"] = nb / c["read_pdl_TBps"] / 1e6
        ceil_rows.append(c)
        print("ceiling", " ".join(f"{k}={v:.3g}" for k, v in c.items()), flush=True)
        for M in (1, 16, 64):
            case = ThinCase(N, K, M)
            packed = Packed(case)
            bm = max(16, triton.next_power_of_2(M))
            grid = list(itertools.product((64,), (128, 256), (3, 4, 6, 8)))
            rm = [(dict(kind="tma_rowmajor", bm=bm, bn=bn, bk=bk, stages=st),
                   tma_runner(_thin_tma_kernel, bm, bn, bk, st, 4, True))
                  for bn, bk, st in grid if (bn + bm) * bk * st <= 220 * 1024]
            sweep(case, rm, "TMA row-major", rows)
            tp = [(dict(kind="tma_packed", bm=bm, bn=bn, bk=bk, stages=st), tma_packed_runner(packed, bm, bn, bk, st, 4))
                  for bn, bk, st in grid if (bn + bm) * bk * st <= 220 * 1024]
            sweep(case, tp, "TMA packed", rows)
            if M <= 16:
                pp = [(dict(kind="ptr_packed", bm=bm, bn=bn, bk=bk, stages=st),
                       ptr_packed_runner(packed, bm, bn, bk, st, 4))
                      for bn, bk, st in itertools.product((32, 64), (256, 512), (4, 6))
                      if (bn + bm) * bk * st <= 220 * 1024]
                sweep(case, pp, "pointer packed", rows)
            del packed, case
            torch.cuda.empty_cache()
    save("thin_packed.json", rows)
    save("thin_packed_ceilings.json", ceil_rows)


if __name__ == "__main__":
    main()

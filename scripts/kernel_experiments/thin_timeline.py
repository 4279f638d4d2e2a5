# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: a per-program timeline of back-to-back thin GEMM calls (where the ~2.5 µs per dependent call goes).

The adopted TMA thin kernel, copied with four `%globaltimer` stamps per program: at entry (before `gdc_wait`), when
the wait returns, after the K loop, after the store. N calls back to back in one CUDA graph, each writing its own
rows. Per call n (medians over calls): the spread of its programs' entries (launch), how long after call n-1's last
program ended its wait returns (release), its loop (streaming), its programs' end spread (tail), and the period
(first wait return of n+1 minus that of n). The stamps cost a few instructions per program.
"""
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import LLAMA8B, ThinCase, save

from workers.kernels import configs
from workers.kernels.gemm import thin_gemm


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def thin_tma_stamped(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, t_ptr, M, N, K, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                     EARLY_SCALES: tl.constexpr = False, STAMP: tl.constexpr = True):
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    t0 = _now()
    if EARLY_SCALES:  # the weight's scales are constants: fetch them before the wait, x's right after it
        w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t1 = _now()
    if EARLY_SCALES:
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        w = w_desc.load([n0, k])
        x = x_desc.load([m0, k])
        acc = tl.dot(w, tl.trans(x), acc)
    t2 = _now()
    if not EARLY_SCALES:
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])
    t3 = _now()
    if STAMP:
        base = t_ptr + pid * 4
        tl.store(base, t0)
        tl.store(base + 1, t1)
        tl.store(base + 2, t2)
        tl.store(base + 3, t3)


def runner(case: ThinCase, early: bool):
    """run(x, xs, w, ws, out) of the kernel without stamps (for graph timing beside the adopted kernel)."""
    cfg = configs.replace(configs.thin_config(case.M, case.N, case.K), tma=True)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    dummy = torch.zeros(1, dtype=torch.int64, device="cuda")

    def run(x, xs, w, ws, out):
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk])
        grid = (triton.cdiv(case.N, bn), triton.cdiv(case.M, bm))
        thin_tma_stamped[grid](xd, xs, wd, ws, out, dummy, case.M, case.N, case.K, out.stride(0), BLOCK_M=bm,
                               BLOCK_N=bn, BLOCK_K=bk, PDL=True, EARLY_SCALES=early, STAMP=False,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=True)
    return run


def timeline(case: ThinCase, calls: int = 48, early: bool = False) -> dict[str, float]:
    cfg = configs.replace(configs.thin_config(case.M, case.N, case.K), tma=True)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    grid = (triton.cdiv(case.N, bn), triton.cdiv(case.M, bm))
    progs = grid[0] * grid[1]
    stamps = torch.zeros(calls, progs, 4, dtype=torch.int64, device="cuda")

    def one(i: int) -> None:
        x, xs, w, ws, out = case.rot()
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk])
        thin_tma_stamped[grid](xd, xs, wd, ws, out, stamps[i], case.M, case.N, case.K, out.stride(0), BLOCK_M=bm,
                               BLOCK_N=bn, BLOCK_K=bk, PDL=True, EARLY_SCALES=early, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, launch_pdl=True)

    one(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            one(i)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for i in range(calls):
            one(i)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    t = stamps.cpu().double() / 1e3  # µs
    rows = {"launch_spread": [], "release": [], "loop": [], "epilogue": [], "tail_spread": [], "period": [],
            "early": []}
    for n in range(8, calls - 1):  # skip the first calls of the replay
        e, w, lp, end = t[n, :, 0], t[n, :, 1], t[n, :, 2], t[n, :, 3]
        prev_end = t[n - 1, :, 3].max()
        rows["launch_spread"].append(float(e.max() - e.min()))
        rows["early"].append(float(prev_end - e.min()))  # how long before the previous call ended the first program entered
        rows["release"].append(float(w.min() - prev_end))
        rows["loop"].append(float((lp - w).median()))
        rows["epilogue"].append(float((end - lp).median()))
        rows["tail_spread"].append(float(end.max() - end.min()))
        rows["period"].append(float(t[n + 1, :, 1].min() - w.min()))
    return {k: statistics.median(v) for k, v in rows.items()} | {"programs": progs}


def main() -> None:
    out = []
    for N, K in LLAMA8B:
        for M in (1, 64):
            case = ThinCase(N, K, M)
            for early in (False, True):
                r = timeline(case, early=early)
                run = runner(case, early)
                err = case.error(run)
                us = [case.time_us(run, rep_ms=20) for _ in range(3)]
                cur = [case.time_us(lambda *a: thin_gemm(*a[:4]), rep_ms=20) for _ in range(3)]
                r.update(N=N, K=K, M=M, early_scales=early, current_us=statistics.median(cur),
                         unstamped_us=statistics.median(us), err=err)
                out.append(r)
                print(f"N={N} K={K} M={M} early_scales={early:d} ({r['programs']} programs): graph {r['unstamped_us']:.2f}"
                      f" us vs adopted {r['current_us']:.2f}; stamped period {r['period']:.2f}; entered {r['early']:.2f} "
                      f"before the previous call ended; release {r['release']:.2f}; loop {r['loop']:.2f}; epilogue "
                      f"{r['epilogue']:.2f}; end spread {r['tail_spread']:.2f}; entry spread {r['launch_spread']:.2f}",
                      flush=True)
    save("thin_timeline.json", out)


if __name__ == "__main__":
    main()

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: prefetch the head of each program's weight rows into L2 before `gdc_wait`.

Question: with PDL the thin GEMM's programs are resident while the kernel before them still runs (every thin
kernel calls `gdc_launch_dependents` first; the 64-program (4096, 4096) grid leaves 68 SMs idle), but they
touch no memory until `gdc_wait` returns, so every call pays the DRAM ramp of its first loads after the
previous kernel has drained. The weights are constants: a program may fetch them before the wait. Session 3
prefetched each program's whole slice (16.8 MB next to a running 16.8 MB stream: evicted and re-read, 20-60%
slower). Here only the first PF bytes of each row (one `cp.async.bulk.prefetch.L2` per half row, one per
thread): at most a few MB, which L2 keeps. Prediction: ~0.5 µs off (64, 4096, 4096) if the ramp is the gap.

Beside it, three read kernels of the same 64-program shape (wait first / prefetch head then wait / no wait at
all) bound what any overlap can give.
"""
import torch
import triton
import triton.language as tl
from _harness import LLAMA8B, ThinCase, save
from triton.tools.tensor_descriptor import TensorDescriptor

from workers.kernels import configs
from workers.kernels.benchmarking import Rotation, time_graph_ms


@triton.jit
def _prefetch_rows(w_ptr, row0, stride_wn, PF_BYTES: tl.constexpr, ROWS: tl.constexpr, PARTS: tl.constexpr):
    """Prefetch the first PF_BYTES of rows row0..row0+ROWS into L2: ROWS * PARTS bulk prefetches of
    PF_BYTES / PARTS bytes (ROWS * PARTS = the program's thread count, one each)."""
    idx = tl.arange(0, ROWS * PARTS)
    row = row0 + idx // PARTS
    part = idx % PARTS
    ptrs = w_ptr + row.to(tl.int64) * stride_wn + part * (PF_BYTES // PARTS)
    nb = tl.full([ROWS * PARTS], PF_BYTES // PARTS, tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                              [ptrs, nb], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def tma_pf(x_desc, xs_ptr, w_desc, w_ptr, ws_ptr, c_ptr, M, N, K, stride_cm, stride_wn,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PF_BYTES: tl.constexpr,
           PARTS: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    tl.extra.cuda.gdc_launch_dependents()
    if PF_BYTES > 0:
        _prefetch_rows(w_ptr, n0, stride_wn, PF_BYTES, BLOCK_N, PARTS)
    tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
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


@triton.jit
def ptr_pf(x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PF_BYTES: tl.constexpr,
           PARTS: tl.constexpr):
    pid_n = tl.program_id(0)
    tl.extra.cuda.gdc_launch_dependents()
    if PF_BYTES > 0:
        _prefetch_rows(w_ptr, pid_n * BLOCK_N, stride_wn, PF_BYTES, BLOCK_N, PARTS)
    tl.extra.cuda.gdc_wait()
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=mmask[None, :])


def runner(cfg, pf: int):
    parts = cfg.num_warps * 32 // cfg.block_n

    def run(x, xs, w, ws, out):
        M, K = x.shape
        N = w.shape[0]
        grid = (N // cfg.block_n, triton.cdiv(M, cfg.block_m))
        common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PF_BYTES=pf, PARTS=parts,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=True)
        if cfg.tma:
            xd = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
            wd = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
            tma_pf[grid](xd, xs, wd, w, ws, out, M, N, K, out.stride(0), w.stride(0), **common)
        else:
            ptr_pf[grid](x, xs, w, ws, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), **common)
    return run


@triton.jit
def read64(x_ptr, out_ptr, per_prog, MODE: tl.constexpr, PF_BYTES: tl.constexpr, BLOCK: tl.constexpr):
    """Each program reads its contiguous per_prog bytes (as int32). MODE 0: wait first; 1: prefetch the first
    PF_BYTES of the slice, then wait; 2: no wait (the bytes do not depend on the previous kernel)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (per_prog // 4)
    tl.extra.cuda.gdc_launch_dependents()
    if MODE == 1:
        p = tl.full([1], 0, tl.int64) + base * 4
        ptrs = x_ptr.to(tl.pointer_type(tl.int8)) + p
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                  [ptrs, tl.full([1], PF_BYTES, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    if MODE != 2:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per_prog // 4, BLOCK):
        acc += tl.load(x_ptr + base + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_us(nbytes: int, progs: int, mode: int, pf: int = 0) -> float:
    per_prog = nbytes // progs
    n = nbytes // 4
    rot = Rotation(lambda: (torch.randint(0, 100, (n,), device="cuda", dtype=torch.int32),), nbytes)
    out = torch.empty(progs, device="cuda", dtype=torch.int32)

    def run():
        read64[(progs,)](rot()[0], out, per_prog, MODE=mode, PF_BYTES=pf, BLOCK=2048, num_warps=8, launch_pdl=True)

    return time_graph_ms(run, calls=max(rot.n, 16)) * 1e3


def main():
    rows = []
    for progs in (64, 128):
        for mode, pf in ((0, 0), (1, 16384), (1, 65536), (2, 0)):
            us = read_us(4096 * 4096, progs, mode, pf)
            r = dict(kind="read", MB=16.8, progs=progs, mode=("wait", "pf_then_wait", "no_wait")[mode], pf=pf, us=us,
                     TBps=4096 * 4096 / us / 1e6)
            rows.append(r)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    for N, K in LLAMA8B:
        for M in (1, 16, 64):
            case = ThinCase(N, K, M)
            cfg = configs.thin_config(M, N, K)
            assert cfg.split_k == 1
            for pf in (0, 256, 512, 1024, 1536, 2048, K):
                run = runner(cfg, pf)
                err = case.error(run)
                us = min(case.time_us(run, rep_ms=20) for _ in range(2))
                r = case.row(us, kind="gemm", tma=cfg.tma, pf=pf, err=err)
                rows.append(r)
                print(f"N={N} K={K} M={M} tma={cfg.tma} pf={pf}: {us:.2f} us ({r['TBps']:.2f} TB/s, "
                      f"{r['tflops']:.0f} TFLOPS) current {case.current_us:.2f} err={err:.2g}", flush=True)
    save("thin_head_prefetch.json", rows)
    print("\nsummary (us): shape M current pf0 best_pf best_us")
    for N, K in LLAMA8B:
        for M in (1, 16, 64):
            rs = [r for r in rows if r["kind"] == "gemm" and r["N"] == N and r["K"] == K and r["M"] == M]
            base = next(r for r in rs if r["pf"] == 0)
            best = min(rs, key=lambda r: r["us"])
            print(f"{N}x{K} M={M} cur={base['current_us']:.2f} pf0={base['us']:.2f} best_pf={best['pf']} "
                  f"best={best['us']:.2f} ({best['tflops']:.0f} TFLOPS)")


if __name__ == "__main__":
    main()

# ruff: noqa: B007, B023, E401, E701, E702, E402, SIM115, UP031  (one-off H100 experiments, kept as they were run)
"""Experiment: a thin FP8 GEMM WITHOUT swap-AB (tokens on the MMA's M side, padded to 64; weights on its N side,
which wgmma allows down to 8), so narrow weight tiles give 128-512 programs; TMA tiles, PDL."""
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
from workers.kernels.benchmarking import Rotation, env_info, time_graph_ms
from workers.kernels.gemm import thin_gemm
from workers.kernels.quant import quantize_per_token
from workers.kernels.reference import scaled_mm_ref

F8 = torch.float8_e4m3fn


@triton.jit
def thin_tma(x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        x = x_desc.load([m0, k])  # [BLOCK_M, BLOCK_K]
        w = w_desc.load([n0, k])  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    out = acc * x_sc[:, None] * w_sc[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def make_run(bm, bn, bk, stages, warps, pdl):
    def run(x, xs, w, ws, out):
        M, K = x.shape
        N = w.shape[0]
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk])
        kw = dict(launch_pdl=True) if pdl else {}
        thin_tma[(triton.cdiv(N, bn), triton.cdiv(M, bm))](xd, xs, wd, ws, out, M, N, K, out.stride(0),
                                                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl,
                                                          num_warps=warps, num_stages=stages, **kw)
    return run


def main():
    rows, best = [], {}
    for (N, K) in [(4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096)]:
        for M in (1, 16, 64):
            def make():
                w, ws = quantize_per_token(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, F8)
                x, xs = quantize_per_token(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), F8)
                return x, xs, w, ws, torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            rot = Rotation(make, N * K)
            x, xs, w, ws, out = rot._sets[0]
            ref = scaled_mm_ref(x, xs, w, ws, torch.bfloat16).float()
            calls = max(rot.n, 16)
            t0 = time_graph_ms(lambda: thin_gemm(*rot()[:4]), calls=calls)
            bm = 64
            for bn, bk, stages, warps in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6, 8), (4,)):
                if (bn + bm) * bk * stages > 220 * 1024:
                    continue
                run = make_run(bm, bn, bk, stages, warps, True)
                try:
                    run(x, xs, w, ws, out)
                    err = float((out.float() - ref).norm() / ref.norm())
                    t = time_graph_ms(lambda: run(*rot()), calls=calls, rep_ms=15)
                except Exception as e:
                    print("fail", N, K, M, bn, bk, stages, type(e).__name__, str(e)[:150]); continue
                r = dict(N=N, K=K, M=M, bm=bm, bn=bn, bk=bk, stages=stages, warps=warps, us=t * 1e3,
                         TBps=N * K / t / 1e9, tflops=2 * M * N * K / t / 1e9, err=err, current_us=t0 * 1e3)
                rows.append(r)
                if err < 0.01 and ((N, K, M) not in best or t * 1e3 < best[(N, K, M)]["us"]):
                    best[(N, K, M)] = r
            b = best.get((N, K, M))
            if b:
                print(f"N={N} K={K} M={M}: current {t0*1e3:.2f} us ({N*K/t0/1e9:.2f} TB/s); no-swap best {b['us']:.2f} us "
                      f"({b['TBps']:.2f} TB/s, {b['tflops']:.0f} TFLOPS) bn={b['bn']} bk={b['bk']} st={b['stages']} err={b['err']:.2g}", flush=True)
    json.dump(dict(env=env_info(), rows=rows), open(os.path.join(os.environ.get("OUT", "/tmp"), "thin_noswap.json"), "w"), indent=1)


if __name__ == "__main__":
    main()

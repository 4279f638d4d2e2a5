"""Shared set-up of the thin-GEMM experiments: operands rotated past L2, the reference, timing, the JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())  # run from the repository root
from workers.kernels.benchmarking import STEADY_CALLS, Rotation, env_info, time_graph_ms  # noqa: E402
from workers.kernels.gemm import thin_gemm  # noqa: E402
from workers.kernels.quant import quantize_per_token  # noqa: E402
from workers.kernels.reference import scaled_mm_ref  # noqa: E402

F8 = torch.float8_e4m3fn
LLAMA8B = [(4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096)]  # (N, K): o, qkv, down, gate_up
if os.environ.get("EXP_QUICK"):  # a smoke run: the o projection only
    LLAMA8B = LLAMA8B[:1]


class ThinCase:
    """M tokens × an [N, K] FP8 weight: argument sets (x, xs, w, ws, out) rotated over ≥ 256 MB, the first
    set's exact product, and the adopted kernel's time (`current_us`)."""

    def __init__(self, N: int, K: int, M: int) -> None:
        self.N, self.K, self.M = N, K, M

        def make() -> tuple[torch.Tensor, ...]:
            w, ws = quantize_per_token(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, F8)
            x, xs = quantize_per_token(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), F8)
            return x, xs, w, ws, torch.empty(M, N, device="cuda", dtype=torch.bfloat16)

        self.rot = Rotation(make, N * K)
        self.first = self.rot._sets[0]
        self.ref = scaled_mm_ref(*self.first[:4], torch.bfloat16).float()
        self.calls = max(self.rot.n, STEADY_CALLS)  # 16 before session 5's scale A/B (NOTES.md)
        self.current_us = self.time_us(lambda *a: thin_gemm(*a[:4]))

    def error(self, run: Callable[..., Any]) -> float:
        """Relative error of run(x, xs, w, ws, out) on the first set (it writes out)."""
        run(*self.first)
        out = self.first[4]
        return float((out.float() - self.ref).norm() / self.ref.norm())

    def time_us(self, run: Callable[..., Any], rep_ms: int = 40) -> float:
        return time_graph_ms(lambda: run(*self.rot()), calls=self.calls, rep_ms=rep_ms) * 1e3

    def row(self, us: float, **extra: Any) -> dict[str, Any]:
        N, K, M = self.N, self.K, self.M
        return dict(N=N, K=K, M=M, **extra, us=us, TBps=N * K / us / 1e6, tflops=2 * M * N * K / us / 1e6,
                    current_us=self.current_us)


def tma_runner(kernel: Any, bm: int, bn: int, bk: int, stages: int, warps: int, pdl: bool) -> Callable[..., None]:
    """run(x, xs, w, ws, out) for a TMA thin kernel with the adopted kernel's signature
    (x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm, BLOCK_M, BLOCK_N, BLOCK_K, PDL); grid (N/bn, M/bm)."""
    def run(x: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out: torch.Tensor) -> None:
        M, K = x.shape
        N = w.shape[0]
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk])
        kw = {"launch_pdl": True} if pdl else {}
        kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](xd, xs, wd, ws, out, M, N, K, out.stride(0), BLOCK_M=bm,
                                                         BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, num_warps=warps,
                                                         num_stages=stages, **kw)
    return run


def sweep(case: ThinCase, variants: Iterable[tuple[dict[str, Any], Callable[..., Any]]], label: str,
          rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Time every (params, run) variant on the case (rows appended); print and return the fastest whose
    error is below 1%."""
    best = None
    for params, run in variants:
        try:
            err = case.error(run)
            us = case.time_us(run, rep_ms=15)
        except Exception as e:  # a config the compiler or shared memory rejects
            print("fail", case.N, case.K, case.M, params, type(e).__name__, str(e)[:150])
            continue
        r = case.row(us, **params, err=err)
        rows.append(r)
        if err < 0.01 and (best is None or us < best["us"]):
            best = r
    if best is not None:
        print(f"N={case.N} K={case.K} M={case.M}: current {case.current_us:.2f} us "
              f"({case.N * case.K / case.current_us / 1e6:.2f} TB/s); {label} best {best['us']:.2f} us "
              f"({best['TBps']:.2f} TB/s, {best['tflops']:.0f} TFLOPS) {params_text(best)} err={best['err']:.2g}",
              flush=True)
    return best


def params_text(r: dict[str, Any]) -> str:
    skip = {"N", "K", "M", "us", "TBps", "tflops", "current_us", "err"}
    return " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)


def save(name: str, rows: list[dict[str, Any]]) -> None:
    """Write {env, rows} to $OUT/name (or /tmp)."""
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(dict(env=env_info(), rows=rows), f, indent=1)

# ruff: noqa: B023  (every lambda below is timed inside the loop iteration that defines it)
"""GPU benchmark of the FP8 causal prefill attention beside torch SDPA in bf16, for scripts/bench_kernels.py.

Shape: the Llama-3.1-8B head layout (32 query heads, 8 KV heads, head_dim 128), one causal sequence of T
tokens laid out as the engine passes it ([T, H, D]). Causal FLOPs = 4 · T² / 2 · D · Hq (two products over
the lower triangle). Rows: each torch SDPA backend that runs (default choice, flash, cuDNN, efficient), our
kernel per launch config (attention launch alone, Q quantized inside it), our K/V quantization launch
alone, and our whole call (quantize K/V + attention) with the chosen config; with the relative error of each against float32 attention.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from workers.kernels import prefill_attention as PA
from workers.kernels.benchmarking import rel_err, time_ms

# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA descriptors, QKᵀ issued one tile ahead)
SWEEP = [(64, 64, 4, 3, 1, 0), (64, 64, 4, 2, 1, 0), (64, 64, 4, 4, 1, 0), (64, 128, 4, 2, 1, 0),
         (64, 128, 4, 3, 1, 0), (64, 128, 4, 3, 0, 0), (128, 128, 8, 3, 1, 0), (128, 128, 8, 2, 1, 0),
         (64, 32, 4, 3, 1, 0)]


def _flops(T: int, Hq: int, D: int) -> float:
    return 4.0 * T * T / 2 * D * Hq


def _sdpa(q, k, v, sm, backend):  # [T, H, D] views, as workers/engine/ops.prefill_attention passes them
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if backend == "default":
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm, enable_gqa=True)
    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    with sdpa_kernel([b]):
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm, enable_gqa=True)


def _exact(q, k, v, sm):
    """float32 causal attention, head by head (memory-efficient kernel in fp32) → [T, Hq, D] float32."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        qh = q[:, h].float()[None, None]
        kh, vh = k[:, h // group].float()[None, None], v[:, h // group].float()[None, None]
        out[:, h] = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm)[0, 0]
    return out


def bench_prefill_attention(sweep: bool = True, lengths: tuple[int, ...] = (1024, 4096, 8192),
                            Hq: int = 32, Hkv: int = 8, D: int = 128) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sm = D**-0.5
    for T in lengths:
        g = torch.Generator(device="cuda").manual_seed(T)
        qkv = torch.randn(T, Hq + 2 * Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]  # strided views, as in the engine
        exact = _exact(q, k, v, sm) if T <= 8192 else None
        fl = _flops(T, Hq, D)

        def row(what, ms, out=None, **extra):
            r = dict(T=T, what=what, ms=ms, TFLOPS=fl / ms / 1e9 if ms else None, **extra)
            if out is not None and exact is not None:
                r["rel_err_vs_fp32"] = rel_err(out.float().reshape(exact.shape), exact)
            rows.append(r)
            print(f"[prefill_attn T={T}] {what}: {ms:.3f} ms" if ms else f"[prefill_attn T={T}] {what}: n/a",
                  flush=True)

        for backend in ("default", "flash", "cudnn", "efficient"):
            try:
                out = _sdpa(q, k, v, sm, backend)
                ms = time_ms(lambda: _sdpa(q, k, v, sm, backend), rep_ms=200)
                row(f"sdpa bf16 {backend}", ms, out[0].transpose(0, 1))
            except Exception as exc:  # a backend that does not take this shape on this build
                row(f"sdpa bf16 {backend}", None, error=f"{type(exc).__name__}: {str(exc)[:120]}")
        kv8 = PA.quantize_kv_for_attention(k, v, sb=PA.SCALE_BLOCK)
        row("fp8 quantize k/v (ours)", time_ms(lambda: PA.quantize_kv_for_attention(k, v, sb=PA.SCALE_BLOCK)))
        best = None
        lazy0 = PA.LAZY_RESCALE
        try:
            for cfg in (SWEEP if sweep else [PA.FWD_CONFIG]):
                for lazy in (True, False):  # lazy vs per-tile accumulator rescaling, same config, same run
                    PA.LAZY_RESCALE = lazy
                    tag = f"{cfg} {'lazy' if lazy else 'eager'} rescale"
                    out = torch.full_like(q, float("nan"))
                    try:
                        PA.attention_fp8_quantized(q, kv8, out, sm, None, T, cfg)
                        ms = time_ms(lambda: PA.attention_fp8_quantized(q, kv8, out, sm, None, T, cfg), rep_ms=200)
                    except Exception as exc:  # e.g. out of shared memory for this tile/stage count
                        row(f"fp8 attention kernel {tag}", None, error=f"{type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    row(f"fp8 attention kernel (q quantized inside) {tag}", ms, out, config=list(cfg), lazy=lazy)
                    if best is None or ms < best[0]:
                        best = (ms, cfg, lazy)
            if best is not None:
                _, cfg, lazy = best
                PA.LAZY_RESCALE = lazy
                out = PA.prefill_attention_fp8(q, k, v, sm, config=cfg)
                ms = time_ms(lambda: PA.prefill_attention_fp8(q, k, v, sm, config=cfg), rep_ms=200)
                row(f"fp8 total: quantize + kernel {cfg} {'lazy' if lazy else 'eager'} rescale", ms, out,
                    config=list(cfg), lazy=lazy, best=True)
        finally:
            PA.LAZY_RESCALE = lazy0
        torch.cuda.empty_cache()
    return rows


def host_overhead(T: int = 256, Hq: int = 32, Hkv: int = 8, D: int = 128, calls: int = 200) -> list[dict[str, Any]]:
    """Host (CPU) microseconds per call of each path at a small T, where the GPU work is tiny, plus the number
    of host-device synchronisations and copies in one call (torch.profiler CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    qkv = torch.randn(T, Hq + 2 * Hkv, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    sm = D**-0.5
    paths = {"sdpa bf16 default": lambda: _sdpa(q, k, v, sm, "default"),
             "fp8 quantize k/v only": lambda: PA.quantize_kv_for_attention(k, v)}
    for cfg in ((64, 64, 4, 3, 0, 0), (128, 64, 4, 3, 1, 0)):
        paths[f"fp8 total {cfg}"] = lambda cfg=cfg: PA.prefill_attention_fp8(q, k, v, sm, config=cfg)
    rows = []
    for name, fn in paths.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        syncs = sum(e.count for e in prof.key_averages()
                    if any(w in e.key for w in ("Synchronize", "Memcpy")) and "cudaDeviceSynchronize" not in e.key)
        rows.append(dict(T=T, what=name, host_us_per_call=host_us, syncs_or_copies=syncs))
        print(f"[host] {name}: {host_us:.1f} us/call, {syncs} sync/copy calls", flush=True)
    return rows

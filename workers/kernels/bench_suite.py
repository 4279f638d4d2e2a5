# ruff: noqa: B023  (every lambda below is timed inside the loop iteration that defines it)
"""Per-kernel GPU benchmarks: each function returns rows (dicts) for scripts/bench_kernels.py to print and save.

Every row times our kernel beside the stock call it replaces (bf16 torch.matmul, torch._scaled_mm, torch ops
for quantization, our own kernel with bf16 KV for attention), with the bytes or FLOPs it must move or do.
GPU only; imports no orchestrator module beyond the types that _common needs.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.kernels import configs
from workers.kernels.attention import paged_decode_attention
from workers.kernels.benchmarking import STEADY_CALLS, read_ceiling_tbps, rotating, time_graph_ms
from workers.kernels.configs import GemmConfig, ThinConfig
from workers.kernels.gemm import scaled_mm, thin_gemm, triton_gemm
from workers.kernels.kv_cache import kv_write
from workers.kernels.packed_weight import pack_weight
from workers.kernels.quant import quantize_per_token, rms_norm_quant, silu_mul_quant

F8 = torch.float8_e4m3fn
DEV = "cuda"
LLAMA8B_THIN = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down

# Stock PyTorch on the H100 (../shared/reference/h100-baseline-2026-11-22.json), (M, K, N) →
# (bf16 weight TB/s, fp8 row-wise weight TB/s, fp8 row-wise TFLOPS).
REF_THIN = {(1, 4096, 6144): (1.689, 1.157, 2.3), (16, 4096, 6144): (1.675, 1.162, 37.2),
            (64, 4096, 6144): (1.746, 1.227, 157.0), (128, 4096, 6144): (1.664, 1.231, 315.1),
            (256, 4096, 6144): (1.52, 1.066, 545.6), (16, 4096, 4096): (1.444, 0.896, 28.7),
            (32, 4096, 4096): (1.517, 0.912, 58.4), (64, 4096, 4096): (1.504, 0.931, 119.2),
            (1, 4096, 28672): (2.447, 1.955, 3.9), (16, 4096, 28672): (2.468, 1.955, 62.6),
            (64, 4096, 28672): (2.389, 1.996, 255.4), (128, 4096, 28672): (2.367, 2.004, 513.1),
            (256, 4096, 28672): (2.097, 1.66, 849.9), (1, 14336, 4096): (2.085, 1.254, 2.5),
            (16, 14336, 4096): (2.072, 1.267, 40.6), (64, 14336, 4096): (2.042, 1.276, 163.3),
            (128, 14336, 4096): (1.93, 1.273, 325.8), (256, 14336, 4096): (1.712, 1.229, 629.3)}
# Square GEMMs, size → (bf16, fp8 row-wise, fp8 row-wise with unfused torch quantization) TFLOPS.
REF_SQUARE = {4096: (735, 1204, 499), 8192: (700, 1236, 776)}
# The seed paper (002), Table 4, H100 / Gaudi 2 FP8 TFLOPS at (64, 4096, 4096); Table 1 H100 FP8 4K/8K.
PAPER = {"thin_64_4096_4096_h100_fp8": 133.9, "thin_64_4096_4096_gaudi2_fp8": 253.4,
         "square_4k_h100_fp8": 1167.6, "square_8k_h100_fp8": 1084.7}


def _bf16(*shape):
    return torch.randn(*shape, device=DEV, dtype=torch.bfloat16)


def _fp8_weight(N, K):
    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) * 0.02
    return quantize_per_token(w, F8)


def _torch_quant(x):
    """Stock dynamic per-token quantization with torch ops (what the reference baseline measured)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / 448.0
    return (x.float() / scale).clamp(-448, 448).to(F8), scale.squeeze(-1)


def _torch_rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def bench_quant() -> list[dict[str, Any]]:
    rows = []
    D = 4096
    for M in (1, 64, 4096, 8192):
        x, r, w = _bf16(M, D), _bf16(M, D), _bf16(D)
        t_fused = time_graph_ms(lambda: rms_norm_quant(x, w, 1e-5, F8, residual=r))
        t_bf16 = time_graph_ms(lambda: rms_norm_quant(x, w, 1e-5, None, residual=r))
        t_torch = time_graph_ms(lambda: _torch_quant(_torch_rms(x + r, w)))
        nbytes = M * D * (2 + 2 + 2 + 1) + M * 4
        rows.append(dict(kernel="rms_norm+res+quant", M=M, D=D, fused_us=t_fused * 1e3, bf16_out_us=t_bf16 * 1e3,
                         torch_unfused_us=t_torch * 1e3, fused_TBps=nbytes / t_fused / 1e9))
    inter = 14336
    for M in (1, 64, 4096, 8192):
        gu = _bf16(M, 2 * inter)
        t_fused = time_graph_ms(lambda: silu_mul_quant(gu, F8))
        t_bf16 = time_graph_ms(lambda: silu_mul_quant(gu, None))
        t_torch = time_graph_ms(lambda: _torch_quant(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]))
        nbytes = M * (4 * inter + inter + 4)
        rows.append(dict(kernel="silu_mul+quant", M=M, D=inter, fused_us=t_fused * 1e3, bf16_out_us=t_bf16 * 1e3,
                         torch_unfused_us=t_torch * 1e3, fused_TBps=nbytes / t_fused / 1e9))
    for M in (4096, 8192):
        x = _bf16(M, D)
        t_q = time_graph_ms(lambda: quantize_per_token(x, F8))
        t_torch = time_graph_ms(lambda: _torch_quant(x))
        rows.append(dict(kernel="quantize_per_token", M=M, D=D, fused_us=t_q * 1e3, torch_unfused_us=t_torch * 1e3,
                         fused_TBps=M * D * 3 / t_q / 1e9))
    return rows


def bench_kv_write() -> list[dict[str, Any]]:
    rows = []
    H, D, bs = 8, 128, 16
    for T in (64, 8192):
        nb = T // bs + 8
        k, v = _bf16(T, H, D), _bf16(T, H, D)
        slots = torch.randperm(nb * bs, device=DEV)[:T]
        kc8 = torch.empty(nb, bs, H, D, device=DEV, dtype=F8)
        vc8 = torch.empty_like(kc8)
        ks = torch.empty(nb, bs, H, device=DEV)
        vs = torch.empty_like(ks)
        kcb = torch.empty(nb, bs, H, D, device=DEV, dtype=torch.bfloat16)
        vcb = torch.empty_like(kcb)
        t8 = time_graph_ms(lambda: kv_write(k, v, slots, kc8, vc8, ks, vs))
        tb = time_graph_ms(lambda: kv_write(k, v, slots, kcb, vcb))
        rows.append(dict(kernel="kv_write", T=T, fp8_us=t8 * 1e3, bf16_us=tb * 1e3,
                         fp8_TBps=T * H * (4 * D + 2 * D + 8) / t8 / 1e9))
    return rows


PREFILL_SHAPES = [(4096, 14336, 4096), (8192, 14336, 4096), (8192, 4096, 14336), (4096, 4096, 4096), (8192, 8192, 8192)]
GEMM_SWEEP = [GemmConfig(128, 256, 128, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 4), GemmConfig(256, 128, 128, 8, 8, 3),
              GemmConfig(128, 256, 64, 8, 8, 4), GemmConfig(128, 128, 128, 8, 4, 4)]


def bench_prefill(sweep: bool) -> list[dict[str, Any]]:
    rows = []
    for M, N, K in PREFILL_SHAPES:
        flops = 2 * M * N * K
        x, w16 = _bf16(M, K), _bf16(N, K) * 0.02
        w_q, w_s = _fp8_weight(N, K)
        a_q, a_s = quantize_per_token(x, F8)
        norm_w = _bf16(K)
        t_bf16 = time_graph_ms(lambda: x @ w16.t(), calls=3)
        t_smm = time_graph_ms(lambda: scaled_mm(a_q, a_s, w_q, w_s), calls=3)
        t_smm_precise = time_graph_ms(lambda: scaled_mm(a_q, a_s, w_q, w_s, fast_accum=False), calls=3)
        cfgs = GEMM_SWEEP if sweep else [configs.gemm_config(M, N, K)]
        t_tri, best = float("inf"), None
        for cfg in cfgs:
            try:
                t = time_graph_ms(lambda cfg=cfg: triton_gemm(a_q, a_s, w_q, w_s, cfg=cfg), calls=3)
            except Exception as exc:  # a config may not fit in shared memory
                print(f"  gemm config {cfg} failed: {type(exc).__name__}")
                continue
            if t < t_tri:
                t_tri, best = t, cfg
        t_quant = time_graph_ms(lambda: quantize_per_token(x, F8))
        t_rmsq = time_graph_ms(lambda: rms_norm_quant(x, norm_w, 1e-5, F8))
        t_rms = time_graph_ms(lambda: rms_norm_quant(x, norm_w, 1e-5, None))
        t_stock = time_graph_ms(lambda: scaled_mm(*_torch_quant(x), w_q, w_s, fast_accum=False), calls=3)
        t_gemm = min(t_smm, t_tri)
        fused_tax = max(0.0, t_rmsq - t_rms)
        rows.append(dict(
            M=M, N=N, K=K, bf16_TFLOPS=flops / t_bf16 / 1e9, scaled_mm_TFLOPS=flops / t_smm / 1e9,
            scaled_mm_precise_accum_TFLOPS=flops / t_smm_precise / 1e9, triton_TFLOPS=flops / t_tri / 1e9, best_triton_cfg=str(best),
            backend="scaled_mm" if t_smm <= t_tri else "triton",
            quant_standalone_us=t_quant * 1e3, quant_fused_marginal_us=fused_tax * 1e3,
            fp8_incl_standalone_quant_vs_bf16=t_bf16 / (t_gemm + t_quant),
            fp8_incl_fused_quant_vs_bf16=t_bf16 / (t_gemm + fused_tax),
            quant_share_of_gemm=t_quant / t_gemm, stock_unfused_vs_bf16=t_bf16 / t_stock,
        ))
    return rows


def _thin_sweep_configs(M: int, wide: bool = False) -> list[ThinConfig]:
    """The launch configs a sweep tries for M tokens; wide=True also tiles M (several programs per weight
    tile, the repeats served from L2) and skips split-K."""
    if wide:
        bms = [b for b in (16, 32, 64) if b <= max(16, M)]
        return [ThinConfig(bm, bn, 256, 1, 4, st) for bm in bms for bn in (32, 64, 128) for st in (4, 6)
                if bm * bn <= 64 * 128]
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    out = []
    for bn in (16, 32, 64) if M <= 64 else (64, 128):
        for bk in (256, 512) if M <= 64 else (128, 256):
            for stages in (4, 6) if M <= 64 else (3, 4):
                for split in (1, 2, 4):
                    out.append(ThinConfig(bm, bn, bk, split, 4, stages))
    return out


def bench_thin(sweep: bool, ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256), wide: bool = False) -> list[dict[str, Any]]:
    rows = []
    for N, K in LLAMA8B_THIN:
        wbytes = N * K
        ceiling = read_ceiling_tbps(wbytes)
        print(f"  read ceiling for {wbytes / 1e6:.1f} MB: {ceiling:.2f} TB/s")
        get8 = rotating(lambda N=N, K=K: _fp8_weight(N, K), wbytes)
        get16 = rotating(lambda N=N, K=K: (_bf16(N, K),), 2 * wbytes)
        tile = configs.packed_tile(N, K)
        getp = rotating(lambda N=N, K=K, tile=tile: _packed_fp8_weight(N, K, tile), wbytes) if tile else None
        for M in ms:
            x = _bf16(M, K)
            a_q, a_s = quantize_per_token(x, F8)
            calls = max(get8.n, get16.n, STEADY_CALLS)
            t_bf16 = time_graph_ms(lambda: x @ get16()[0].t(), calls=calls)
            t_smm = time_graph_ms(lambda: scaled_mm(a_q, a_s, *get8()), calls=calls) if M % 16 == 0 else float("nan")
            cfgs = _thin_sweep_configs(M, wide) + [configs.thin_config(M, N, K)] if sweep else [configs.thin_config(M, N, K)]
            t_thin, best = float("inf"), None
            for cfg in cfgs:
                try:
                    t = time_graph_ms(lambda cfg=cfg: thin_gemm(a_q, a_s, *get8(), cfg=cfg), calls=calls,
                                      rep_ms=15 if sweep else 40)
                except Exception as exc:  # e.g. a config over the shared-memory limit
                    print(f"  thin config {cfg} failed: {type(exc).__name__}")
                    continue
                if t < t_thin:
                    t_thin, best = t, cfg
            # the figure of sessions 1-4 (graphs of max(rotation, 8) calls), kept beside the steady-state one
            t_thin_short = time_graph_ms(lambda: thin_gemm(a_q, a_s, *get8(), cfg=best), calls=max(get8.n, 8)) \
                if best is not None else float("nan")
            # the engine's weight: tile-packed for configs.PACKED_SHAPES (packed_weight.py), else row-major
            t_packed = time_graph_ms(lambda: thin_gemm(a_q, a_s, *getp()), calls=calls) if getp else float("nan")
            t_engine = t_packed if getp else t_thin
            flops = 2 * M * N * K
            ref = REF_THIN.get((M, K, N))
            rows.append(dict(
                M=M, N=N, K=K, thin_us=t_thin * 1e3, thin_weight_TBps=wbytes / t_thin / 1e9,
                read_ceiling_TBps=ceiling,
                thin_TFLOPS=flops / t_thin / 1e9, thin_us_short_graph=t_thin_short * 1e3,
                thin_TFLOPS_short_graph=flops / t_thin_short / 1e9, graph_calls=calls,
                packed_weight_TBps=wbytes / t_packed / 1e9, engine_layout="packed" if getp else "row-major",
                engine_us=t_engine * 1e3, engine_weight_TBps=wbytes / t_engine / 1e9,
                engine_TFLOPS=flops / t_engine / 1e9,
                scaled_mm_weight_TBps=wbytes / t_smm / 1e9,
                bf16_weight_TBps=2 * wbytes / t_bf16 / 1e9, fp8_vs_bf16_speedup=t_bf16 / t_thin,
                ref_stock_fp8_TBps=ref[1] if ref else None, ref_stock_bf16_TBps=ref[0] if ref else None,
                cfg=best.__dict__ if best else None,
            ))
            print(f"  thin M={M} N={N} K={K}: {t_thin * 1e3:.1f} us {wbytes / t_thin / 1e9:.2f} TB/s cfg={best}"
                  + (f"; packed {t_packed * 1e3:.1f} us {wbytes / t_packed / 1e9:.2f} TB/s" if getp else ""))
    return rows


def _packed_fp8_weight(N: int, K: int, tile: tuple[int, int]) -> tuple[Any, torch.Tensor]:
    w_q, w_s = _fp8_weight(N, K)
    return pack_weight(w_q, *tile), w_s


def bench_packed_prefill(ms: tuple[int, ...] = (300, 512, 2048, 8192)) -> list[dict[str, Any]]:
    """Prefill-sized FP8 GEMMs on a tile-packed weight (what an engine that packed it runs above THIN_MAX_M: the
    Triton GEMM reading tiles) against the row-major weight's cuBLASLt and Triton GEMMs."""
    rows = []
    for N, K in configs.PACKED_SHAPES:
        tile = configs.packed_tile(N, K) or configs.PACKED_SHAPES[(N, K)][:2]
        w_q, w_s = _fp8_weight(N, K)
        packed = pack_weight(w_q, *tile)
        for M in ms:
            a_q, a_s = quantize_per_token(_bf16(M, K), F8)
            t_smm = time_graph_ms(lambda: scaled_mm(a_q, a_s, w_q, w_s), calls=3)
            t_tri = time_graph_ms(lambda: triton_gemm(a_q, a_s, w_q, w_s), calls=3)
            t_packed = min(time_graph_ms(lambda cfg=cfg: triton_gemm(a_q, a_s, packed, w_s, cfg=cfg), calls=3)
                           for cfg in GEMM_SWEEP if cfg.block_k <= tile[1])
            rows.append(dict(M=M, N=N, K=K, scaled_mm_us=t_smm * 1e3, triton_rowmajor_us=t_tri * 1e3,
                             triton_packed_us=t_packed * 1e3, packed_over_scaled_mm=t_packed / t_smm,
                             packed_TFLOPS=2 * M * N * K / t_packed / 1e9))
            print(f"  packed prefill M={M} N={N} K={K}: cuBLASLt {t_smm * 1e3:.1f} us, Triton {t_tri * 1e3:.1f}, "
                  f"Triton packed {t_packed * 1e3:.1f} ({t_packed / t_smm:.2f}x)")
    return rows


def _attn_case(B, ctx, dtype, Hq=32, Hkv=8, D=128, bs=16):
    nblk = B * ctx // bs
    kc = torch.randn(nblk, bs, Hkv, D, device=DEV, dtype=torch.bfloat16).to(dtype)
    vc = torch.randn(nblk, bs, Hkv, D, device=DEV, dtype=torch.bfloat16).to(dtype)
    fp8 = dtype != torch.bfloat16
    ks = torch.rand(nblk, bs, Hkv, device=DEV) * 0.01 if fp8 else None
    vs = torch.rand(nblk, bs, Hkv, device=DEV) * 0.01 if fp8 else None
    table = torch.randperm(nblk, device=DEV).to(torch.int32).reshape(B, ctx // bs)
    return kc, vc, ks, vs, table


# (BLOCK_T, num_warps, num_stages), tried for both KV dtypes; the best of each is reported.
ATTN_CONFIGS = [(32, 1, 2), (64, 2, 2), (64, 2, 3), (64, 4, 3), (128, 4, 3), (64, 4, 2)]


# Batch 1 is also measured at 4K, 16K and 32K: attention_fit separates a call's fixed cost (launches, the
# dependent first loads, the merge) from its cost per KV token.
ATTN_CASES = [(B, ctx) for B in (1, 16, 64) for ctx in (1024, 2048, 8192)] + [(1, 4096), (1, 16384), (1, 32768)]


def attention_fit(rows: list[dict[str, Any]], B: int = 1, min_ctx: int = 2048) -> dict[str, float] | None:
    """Least-squares time = fixed + per_token · ctx for each KV dtype over the rows of batch B with ctx >= min_ctx:
    fixed_us, per-KV-token ns, and the per-token ratio fp8 / bf16."""
    pts = sorted((r["ctx"], r["fp8_us"], r["bf16_us"]) for r in rows if r["B"] == B and r["ctx"] >= min_ctx)
    if len(pts) < 3:
        return None
    out: dict[str, float] = {"B": B, "points": len(pts)}
    xs = [p[0] for p in pts]
    mx = sum(xs) / len(xs)
    for i, name in ((1, "fp8"), (2, "bf16")):
        ys = [p[i] for p in pts]
        my = sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        out[f"{name}_fixed_us"] = my - slope * mx
        out[f"{name}_ns_per_token"] = slope * 1e3 / B
    out["per_token_fp8_over_bf16"] = out["fp8_ns_per_token"] / out["bf16_ns_per_token"]
    return out


def bench_attention() -> list[dict[str, Any]]:
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B, ctx in ATTN_CASES:
        q = _bf16(B, Hq, D)
        lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
        res = {}
        for name, dtype in (("fp8", F8), ("bf16", torch.bfloat16)):
            per_tok = Hkv * D * 2 * dtype.itemsize + (Hkv * 8 if name == "fp8" else 0)
            get = rotating(lambda dtype=dtype: _attn_case(B, ctx, dtype), B * ctx * per_tok)
            best: tuple[float, Any] = (float("inf"), None)
            for cfg in ATTN_CONFIGS:
                def run(get=get, cfg=cfg):
                    kc, vc, ks, vs, table = get()
                    return paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx,
                                                  block_t=cfg[0], num_warps=cfg[1], num_stages=cfg[2])

                try:
                    best = min(best, (time_graph_ms(run, calls=max(get.n, STEADY_CALLS)), cfg))
                except Exception as exc:  # e.g. over the shared-memory limit
                    print(f"  attention config {cfg} failed: {type(exc).__name__}")
            res[name] = (best[0], B * ctx * per_tok / best[0] / 1e9, best[1])
            del get
        rows.append(dict(B=B, ctx=ctx, fp8_us=res["fp8"][0] * 1e3, bf16_us=res["bf16"][0] * 1e3,
                         fp8_TBps=res["fp8"][1], bf16_TBps=res["bf16"][1],
                         fp8_over_bf16=res["fp8"][0] / res["bf16"][0], fp8_cfg=res["fp8"][2],
                         bf16_cfg=res["bf16"][2]))
    return rows


def bench_attention_variants(B: int = 64, ctx: int = 2048) -> list[dict[str, Any]]:
    """One decode-attention case over launch configs x split counts, both KV dtypes (a tuning probe)."""
    rows = []
    Hq, Hkv, D = 32, 8, 128
    q = _bf16(B, Hq, D)
    lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
    for name, dtype in (("fp8", F8), ("bf16", torch.bfloat16)):
        per_tok = Hkv * D * 2 * dtype.itemsize + (Hkv * 8 if name == "fp8" else 0)
        get = rotating(lambda dtype=dtype: _attn_case(B, ctx, dtype), B * ctx * per_tok)
        for splits in (1, 2):
            for cfg in [(64, 2, 2, 0, 1), (64, 2, 2, 0, 0), (32, 2, 2, 0, 1), (64, 2, 3, 0, 1), (64, 4, 2, 0, 1),
                        (32, 1, 2, 0, 1), (128, 4, 2, 0, 1), (128, 4, 3, 0, 1), (64, 4, 3, 0, 1)]:
                def run(get=get, cfg=cfg, splits=splits):
                    kc, vc, ks, vs, table = get()
                    return paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, num_splits=splits,
                                                  block_t=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
                                                  max_regs=cfg[3] or None, off32=bool(cfg[4]))

                try:
                    t = time_graph_ms(run, calls=max(get.n, 4), rep_ms=20)
                except Exception as exc:
                    print(f"  {name} {cfg} splits={splits} failed: {type(exc).__name__}")
                    continue
                rows.append(dict(kv=name, B=B, ctx=ctx, splits=splits, cfg=cfg, us=t * 1e3,
                                 TBps=B * ctx * per_tok / t / 1e9))
        del get
    for kv in ("fp8", "bf16"):
        best = sorted((r for r in rows if r["kv"] == kv), key=lambda r: r["us"])[:3]
        for r in best:
            print(f"  best {kv}: {r['us']:.1f} us {r['TBps']:.2f} TB/s splits={r['splits']} cfg={r['cfg']}")
    return rows

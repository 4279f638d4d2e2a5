"""Quantization fused into its producer: RMSNorm (+residual) + per-token FP8, SiLU-and-mul + per-token FP8.

One program per row: the whole row sits in registers (BLOCK_D = next power of two ≥ D), so the producer's
output never goes through device memory before it is quantized. With `fp8_dtype=None` the same kernels
write bf16/fp16/fp32 instead (the bf16 engine path uses them, so bf16-vs-fp8 comparisons are fair).

Contracts (see reference.py for the exact math):
- rms_norm_quant(x [..., D], weight [D], eps, fp8_dtype, residual=None)
    → (q [..., D] fp8, scale [...] float32, new_residual [..., D] or None)
- silu_mul_quant(gate_up [..., 2I], fp8_dtype) → (q [..., I] fp8, scale [...] float32)
- quantize_per_token(x [..., D], fp8_dtype) → (q, scale)       (standalone, when no producer can host it)
With fp8_dtype=None the first tensor is in x.dtype (or out_dtype) and scale is None.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels._common import AMAX_FLOOR, check, check_same_device, fp8_max, next_pow2, pdl_enabled

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _quant_store(y, out_ptrs, scale_ptr, mask, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr):
    """Per-row dynamic quantization of a float32 row y, stored at out_ptrs; its scale at scale_ptr."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), AMAX_MIN)
    scale = amax / FP8_MAX
    q = tl.clamp(tl.math.div_rn(y, scale), -FP8_MAX, FP8_MAX)
    tl.store(out_ptrs, q.to(out_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, scale_ptr,
    D, stride_x, stride_r, stride_ro, stride_o, eps,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr,
    BLOCK_D: tl.constexpr, TRIGGER: tl.constexpr,
):
    if TRIGGER:  # the consumer (an FP8 GEMM launched with PDL) may launch now; it waits for our writes
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    out_ptrs = out_ptr + row * stride_o + offs
    if QUANT:
        _quant_store(y, out_ptrs, scale_ptr + row, mask, FP8_MAX, AMAX_MIN)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(
    gu_ptr, out_ptr, scale_ptr, N_INTER, stride_gu, stride_o,
    QUANT: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr, BLOCK_I: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_I)
    mask = offs < N_INTER
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + N_INTER + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    out_ptrs = out_ptr + row * stride_o + offs
    if QUANT:
        _quant_store(y, out_ptrs, scale_ptr + row, mask, FP8_MAX, AMAX_MIN)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_kernel(
    x_ptr, out_ptr, scale_ptr, D, stride_x, stride_o,
    FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr, BLOCK_D: tl.constexpr, TRIGGER: tl.constexpr,
):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    y = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _quant_store(y, out_ptr + row * stride_o + offs, scale_ptr + row, mask, FP8_MAX, AMAX_MIN)


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    check(x.dim() >= 1 and x.shape[-1] > 0, f"{name} must have a non-empty last dimension, got {tuple(x.shape)}")
    check(x.dtype in _FLOAT_DTYPES, f"{name} must be bf16, fp16 or fp32, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _out(rows: int, cols: int, like: torch.Tensor, fp8_dtype: torch.dtype | None, out_dtype: torch.dtype | None):
    if fp8_dtype is None:
        out = torch.empty(rows, cols, dtype=out_dtype or like.dtype, device=like.device)
        return out, None, 1.0
    fmax = fp8_max(fp8_dtype)
    out = torch.empty(rows, cols, dtype=fp8_dtype, device=like.device)
    scale = torch.empty(rows, dtype=torch.float32, device=like.device)
    return out, scale, fmax


def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fp8_dtype: torch.dtype | None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """RMSNorm(x [+ residual]) · weight, quantized per token when fp8_dtype is given.

    Returns (y, scale, new_residual): y [..., D] in fp8_dtype (else out_dtype or x.dtype); scale [...] float32
    or None; new_residual = x + residual rounded to x.dtype (None without a residual). Raises KernelInputError.
    """
    D = x.shape[-1] if x.dim() else 0
    x2 = _rows(x, "x")
    check(weight.shape == (D,), f"weight must have shape ({D},), got {tuple(weight.shape)}")
    check_same_device(x, weight, residual)
    lead = x.shape[:-1]
    M = x2.shape[0]
    out, scale, fmax = _out(M, D, x2, fp8_dtype, out_dtype)
    if residual is not None:
        check(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = _rows(residual, "residual")
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2
    if M > 0:
        block = next_pow2(D)
        _rms_norm_kernel[(M,)](
            x2, r2, res_out, weight, out, scale if scale is not None else out,
            D, x2.stride(0), r2.stride(0), res_out.stride(0), out.stride(0), float(eps),
            HAS_RES=residual is not None, QUANT=scale is not None, FP8_MAX=fmax, AMAX_MIN=AMAX_FLOOR,
            BLOCK_D=block, TRIGGER=pdl_enabled(x2.device), num_warps=_warps(block),
        )
    new_res = res_out.reshape(x.shape) if residual is not None else None
    return out.reshape(*lead, D), (scale.reshape(lead) if scale is not None else None), new_res


def silu_mul_quant(
    gate_up: torch.Tensor, fp8_dtype: torch.dtype | None, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(gate) * up for gate_up [..., 2I] (gate first), quantized per token when fp8_dtype is given."""
    g2 = _rows(gate_up, "gate_up")
    check(g2.shape[1] % 2 == 0, f"gate_up's last dimension must be even (gate, up), got {g2.shape[1]}")
    M, inter = g2.shape[0], g2.shape[1] // 2
    out, scale, fmax = _out(M, inter, g2, fp8_dtype, out_dtype)
    if M > 0:
        block = next_pow2(inter)
        _silu_mul_kernel[(M,)](
            g2, out, scale if scale is not None else out, inter, g2.stride(0), out.stride(0),
            QUANT=scale is not None, FP8_MAX=fmax, AMAX_MIN=AMAX_FLOOR, BLOCK_I=block,
            TRIGGER=pdl_enabled(g2.device), num_warps=_warps(block),
        )
    lead = gate_up.shape[:-1]
    return out.reshape(*lead, inter), (scale.reshape(lead) if scale is not None else None)


def quantize_per_token(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) FP8 quantization of x [..., D] → (q [..., D], scale [...] float32)."""
    x2 = _rows(x, "x")
    M, D = x2.shape
    out, scale, fmax = _out(M, D, x2, fp8_dtype, None)
    if M > 0:
        block = next_pow2(D)
        _quant_kernel[(M,)](
            x2, out, scale, D, x2.stride(0), out.stride(0),
            FP8_MAX=fmax, AMAX_MIN=AMAX_FLOOR, BLOCK_D=block, TRIGGER=pdl_enabled(x2.device),
            num_warps=_warps(block),
        )
    return out.reshape(x.shape), scale.reshape(x.shape[:-1])

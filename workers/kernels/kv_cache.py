"""Quantize-and-write of new K/V into the paged cache, per token per KV head scales (one launch for K and V).

Contract:
    kv_write(k, v, slot_mapping, k_cache, v_cache, k_scale=None, v_scale=None)
      k, v:           [T, Hkv, D] bf16/fp16/fp32 (last dim contiguous)
      slot_mapping:   [T] int (slot = block_id * block_size + offset; -1 = skip the token, e.g. padding)
      k_cache/v_cache:[num_blocks, block_size, Hkv, D] fp8 or bf16, any strides (same for K and V)
      k_scale/v_scale:[num_blocks, block_size, Hkv] float32, required iff the cache is FP8
    For FP8: scale = max(amax over D, AMAX_FLOOR) / FP8_MAX, stored value = round(x / scale) (see reference.py).
One program per token handles every head of K and V, so a decode step writes its new KV in one launch.
Slots are not bounds-checked on the device (graph-safe); the caller owns the block tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels._common import AMAX_FLOOR, FP8_MAX, check, check_same_device, next_pow2


@triton.jit
def _write_one(src_ptr, stride_t, stride_h, t, cache_ptr, cache_off, scale_ptr, scale_off,
               offs_h, offs_d, H, stride_ch, stride_sh, mask,
               QUANT: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr):
    x = tl.load(src_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    dst = cache_ptr + cache_off + offs_h[:, None] * stride_ch + offs_d[None, :]
    if QUANT:
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_MIN)  # [BLOCK_H]
        scale = amax / FP8_MAX
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX)
        tl.store(dst, q.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + scale_off + offs_h * stride_sh, scale, mask=offs_h < H)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    H, D, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
    QUANT: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
        cache_off = blk * stride_cb + off * stride_ct
        scale_off = blk * stride_sb + off * stride_st
        _write_one(k_ptr, stride_kt, stride_kh, t, kc_ptr, cache_off, ks_ptr, scale_off,
                   offs_h, offs_d, H, stride_ch, stride_sh, mask, QUANT, FP8_MAX, AMAX_MIN)
        _write_one(v_ptr, stride_vt, stride_vh, t, vc_ptr, cache_off, vs_ptr, scale_off,
                   offs_h, offs_d, H, stride_ch, stride_sh, mask, QUANT, FP8_MAX, AMAX_MIN)


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v [T, Hkv, D] into the paged caches at slot_mapping (in place). Raises KernelInputError."""
    check(k.dim() == 3 and k.shape == v.shape, f"k and v must be [T, Hkv, D] of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    T, H, D = k.shape
    check(k_cache.dim() == 4 and k_cache.shape[2:] == (H, D),
          f"k_cache must be [num_blocks, block_size, {H}, {D}], got {tuple(k_cache.shape)}")
    check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype,
          "v_cache must match k_cache in shape, strides and dtype")
    check(k_cache.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "the head_dim axis must be contiguous")
    check(slot_mapping.shape == (T,) and not slot_mapping.dtype.is_floating_point,
          f"slot_mapping must be an integer tensor of shape ({T},), got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    quant = k_cache.dtype in FP8_MAX
    check(quant or k_cache.dtype in (torch.bfloat16, torch.float16, torch.float32),
          f"unsupported KV cache dtype {k_cache.dtype}")
    if quant:
        check(k_scale is not None and v_scale is not None, "an FP8 KV cache needs k_scale and v_scale")
        check(k_scale.shape == k_cache.shape[:3] and v_scale.shape == k_scale.shape
              and v_scale.stride() == k_scale.stride() and k_scale.dtype == torch.float32 == v_scale.dtype,
              f"k_scale/v_scale must be float32 {tuple(k_cache.shape[:3])} with equal strides")
    else:
        k_scale = v_scale = k_cache  # unused placeholders
    check_same_device(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale)
    if T == 0:
        return
    _kv_write_kernel[(T,)](
        k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale,
        H, D, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2) if quant else 0,
        QUANT=quant, FP8_MAX=FP8_MAX.get(k_cache.dtype, 1.0), AMAX_MIN=AMAX_FLOOR,
        BLOCK_H=next_pow2(H), BLOCK_D=next_pow2(D), num_warps=4,
    )


@triton.jit
def _rope_half(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr, pos_ptr, inv_ptr, slot_ptr, q_out_ptr, k_out_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    HQ, HKV, block_size, stride_t, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
    D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    QUANT: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr, STORE_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + d)
    cos = tl.cos(ang)[None, :]
    sin = tl.sin(ang)[None, :]
    row = qkv_ptr + t * stride_t
    # q: rotate and store
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = hq < HQ
    q1 = tl.load(row + hq * D + d[None, :], mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(row + hq * D + HALF + d[None, :], mask=mq, other=0.0).to(tl.float32)
    o1, o2 = _rope_half(q1, q2, cos, sin)
    qo = q_out_ptr + t * stride_qt + hq * stride_qh + d[None, :]
    tl.store(qo, o1.to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(qo + HALF, o2.to(q_out_ptr.dtype.element_ty), mask=mq)
    # k (rotated) and v into the cache
    hk = tl.arange(0, BLOCK_HKV)
    mk = (hk < HKV)[:, None]
    k_base = row + HQ * D + hk[:, None] * D + d[None, :]
    k1, k2 = _rope_half(tl.load(k_base, mask=mk, other=0.0).to(tl.float32),
                        tl.load(k_base + HALF, mask=mk, other=0.0).to(tl.float32), cos, sin)
    # round the rotated k to the activation dtype first: the cache then holds exactly what a per-token
    # quantization of k_out would store (colocated prefill and KV export give identical bytes)
    k1 = k1.to(qkv_ptr.dtype.element_ty).to(tl.float32)
    k2 = k2.to(qkv_ptr.dtype.element_ty).to(tl.float32)
    if STORE_K:  # the rotated k in the activation dtype, for a prefill attention that reads K unquantized
        ko = k_out_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
        tl.store(ko, k1.to(k_out_ptr.dtype.element_ty), mask=mk)
        tl.store(ko + HALF, k2.to(k_out_ptr.dtype.element_ty), mask=mk)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        v_base = k_base + HKV * D
        v1 = tl.load(v_base, mask=mk, other=0.0).to(tl.float32)
        v2 = tl.load(v_base + HALF, mask=mk, other=0.0).to(tl.float32)
        c_off = blk * stride_cb + off * stride_ct + hk[:, None] * stride_ch + d[None, :]
        s_off = blk * stride_sb + off * stride_st + hk * stride_sh
        if QUANT:
            k_sc = tl.maximum(tl.maximum(tl.max(tl.abs(k1), axis=1), tl.max(tl.abs(k2), axis=1)), AMAX_MIN) / FP8_MAX
            v_sc = tl.maximum(tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1)), AMAX_MIN) / FP8_MAX
            k1 = tl.clamp(tl.math.div_rn(k1, k_sc[:, None]), -FP8_MAX, FP8_MAX)
            k2 = tl.clamp(tl.math.div_rn(k2, k_sc[:, None]), -FP8_MAX, FP8_MAX)
            v1 = tl.clamp(tl.math.div_rn(v1, v_sc[:, None]), -FP8_MAX, FP8_MAX)
            v2 = tl.clamp(tl.math.div_rn(v2, v_sc[:, None]), -FP8_MAX, FP8_MAX)
            tl.store(ks_ptr + s_off, k_sc, mask=hk < HKV)
            tl.store(vs_ptr + s_off, v_sc, mask=hk < HKV)
        ty = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + c_off, k1.to(ty), mask=mk)
        tl.store(kc_ptr + c_off + HALF, k2.to(ty), mask=mk)
        tl.store(vc_ptr + c_off, v1.to(ty), mask=mk)
        tl.store(vc_ptr + c_off + HALF, v2.to(ty), mask=mk)


def rope_kv_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE (rotate-half) on q and k of a fused QKV projection, then K/V quantize-and-write; one launch.

    qkv [T, (Hq + 2·Hkv)·D] (q heads, then k heads, then v heads; row-contiguous), positions [T] int,
    inv_freq [D/2] float32 (the model's frequencies, any RoPE scaling already applied). Returns q [T, Hq, D]
    rotated, in qkv.dtype; the caches are written as kv_write does (see reference.rope_kv_write_ref) from
    the rotated k rounded to qkv.dtype. k_out [T, Hkv, D] (optional, qkv.dtype) also receives that rotated
    k unquantized (prefill attention reads it); the cached K is then bit-identical to
    `quant.quantize_per_token(k_out)`.
    """
    check(qkv.dim() == 2 and qkv.stride(1) == 1, f"qkv must be [T, (Hq+2Hkv)*D] row-contiguous, got {tuple(qkv.shape)}")
    T = qkv.shape[0]
    check(k_cache.dim() == 4 and k_cache.stride(-1) == 1, "k_cache must be [blocks, block_size, Hkv, D]")
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    check(qkv.shape[1] == (num_heads + 2 * Hkv) * D, f"qkv width {qkv.shape[1]} != ({num_heads} + 2*{Hkv}) * {D}")
    check(D % 2 == 0 and (D & (D - 1)) == 0, f"head_dim must be a power of two, got {D}")
    check(inv_freq.shape == (D // 2,) and inv_freq.dtype == torch.float32, f"inv_freq must be float32 [{D // 2}]")
    check(positions.shape == (T,) and slot_mapping.shape == (T,), f"positions and slot_mapping must be [{T}]")
    check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype,
          "v_cache must match k_cache in shape, strides and dtype")
    quant = k_cache.dtype in FP8_MAX
    if quant:
        check(k_scale is not None and v_scale is not None and k_scale.shape == k_cache.shape[:3]
              and v_scale.stride() == k_scale.stride(), "an FP8 KV cache needs k_scale/v_scale [blocks, block_size, Hkv]")
    else:
        k_scale = v_scale = k_cache
    check_same_device(qkv, positions, inv_freq, slot_mapping, k_cache, v_cache, k_scale, v_scale, k_out)
    if k_out is not None:
        check(k_out.shape == (T, Hkv, D) and k_out.stride(-1) == 1, f"k_out must be [{T}, {Hkv}, {D}]")
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    _rope_kv_write_kernel[(T,)](
        qkv, positions, inv_freq, slot_mapping, q, k_out if k_out is not None else q, k_cache, v_cache, k_scale,
        v_scale, num_heads, Hkv, k_cache.shape[1], qkv.stride(0), q.stride(0), q.stride(1),
        k_out.stride(0) if k_out is not None else 0, k_out.stride(1) if k_out is not None else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2) if quant else 0,
        D=D, BLOCK_HQ=next_pow2(num_heads), BLOCK_HKV=next_pow2(Hkv),
        QUANT=quant, FP8_MAX=FP8_MAX.get(k_cache.dtype, 1.0), AMAX_MIN=AMAX_FLOOR, STORE_K=k_out is not None,
        num_warps=4,
    )
    return q

"""Torch references of every kernel in this package: the definitions the Triton kernels must match.

Each reference computes in float32 from the same inputs and rounds only where the kernel rounds, so a
kernel that is right matches it to FP8/bf16 rounding. Conventions shared with the kernels:

- Dynamic per-token quantization: scale[m] = max(amax(row m), AMAX_FLOOR) / FP8_MAX, q = x / scale
  rounded to nearest even and clamped to ±FP8_MAX; dequantized value = q * scale.
- Weights are [N, K] (out_features × in_features, as in nn.Linear), FP8 with one float32 scale per output
  channel ([N]); the product is (a_q · a_scale) @ (w_q · w_scale)ᵀ, accumulated in float32.
- Paged KV cache: k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim] (any strides), FP8 or
  bf16; for FP8 one float32 scale per token per KV head in k_scale/v_scale [num_blocks, block_size,
  num_kv_heads]. A token's slot is block_id * block_size + offset; slot_mapping[t] = -1 skips token t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.kernels._common import AMAX_FLOOR, fp8_max


def quantize_per_token_ref(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, D] any float dtype → (q [M, D] fp8_dtype, scale [M] float32)."""
    xf = x.float()
    fmax = fp8_max(fp8_dtype)
    amax = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scale = amax / fmax
    q = (xf / scale[..., None]).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm in float32 → (y float32 [M, D], new residual in x.dtype or None).

    With a residual, h = round_to_x_dtype(x + residual) is both the new residual and the normalized input.
    """
    h = x.float()
    new_residual = None
    if residual is not None:
        new_residual = (h + residual.float()).to(x.dtype)
        h = new_residual.float()
    y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y, new_residual


def rms_norm_quant_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fp8_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm then dynamic per-token FP8 quantization, no rounding in between → (q, scale, new_residual)."""
    y, new_residual = rms_norm_ref(x, weight, eps, residual)
    q, scale = quantize_per_token_ref(y, fp8_dtype)
    return q, scale, new_residual


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] (gate first, up second) → silu(gate) * up in float32 [M, I]."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return F.silu(g) * u


def silu_mul_quant_ref(gate_up: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_token_ref(silu_mul_ref(gate_up), fp8_dtype)


def scaled_mm_ref(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a_q [M, K] · a_scale [M]) @ (w_q [N, K] · w_scale [N])ᵀ in float32, cast to out_dtype."""
    acc = a_q.float() @ w_q.float().t()
    return (acc * a_scale.float()[:, None] * w_scale.float()[None, :]).to(out_dtype)


def kv_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v [T, Hkv, D] into the paged caches in place (quantizing per token per head for FP8)."""
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        blk, off = divmod(slot, block_size)
        for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
            if scale is None:
                cache[blk, off] = src[t].to(cache.dtype)
            else:
                q, s = quantize_per_token_ref(src[t], cache.dtype)  # rows are heads: [Hkv, D]
                cache[blk, off] = q
                scale[blk, off] = s


def gather_kv_ref(
    cache: torch.Tensor, scale: torch.Tensor | None, block_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Dequantize one sequence's first seq_len tokens from a paged cache → float32 [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    t = torch.arange(seq_len, device=cache.device)
    blk = block_table_row.long()[t // block_size]
    off = t % block_size
    vals = cache[blk, off].float()
    if scale is not None:
        vals = vals * scale[blk, off].float()[..., None]
    return vals


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] → out [B, Hq, D] in q.dtype (float32 math, GQA)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        k = gather_kv_ref(k_cache, k_scale, block_table[b], n)  # [n, Hkv, D]
        v = gather_kv_ref(v_cache, v_scale, block_table[b], n)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * sm_scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def rope_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32: x [T, H, D] → float32 [T, H, D]."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_kv_write_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE on q and k of qkv [T, (Hq+2Hkv)·D], K/V written as kv_write_ref does (k rotated in float32, then
    rounded to qkv's dtype before quantization; v as given)."""
    T = qkv.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    q, k, v = qkv.float().split([num_heads * D, Hkv * D, Hkv * D], dim=-1)
    q = rope_ref(q.reshape(T, num_heads, D), positions, inv_freq)
    k = rope_ref(k.reshape(T, Hkv, D), positions, inv_freq).to(qkv.dtype).float()  # the kernel rounds k too
    kv_write_ref(k, v.reshape(T, Hkv, D), slot_mapping, k_cache, v_cache, k_scale, v_scale)
    return q.to(qkv.dtype)


def causal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal GQA attention in float32 of q [T, Hq, D], k, v [T, Hkv, D] (packed sequences) → float32 [T, Hq, D]."""
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b == a:
            continue
        qh = q[a:b].float().transpose(0, 1)  # [Hq, n, D]
        kh = k[a:b].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vh = v[a:b].float().repeat_interleave(group, dim=1).transpose(0, 1)
        out[a:b] = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm_scale).transpose(0, 1)
    return out


def quantize_blocks_ref(
    x: torch.Tensor, block: int, fp8_dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, H, D] → its dequantized value (float32) after FP8 quantization with one scale per (block of
    `block` tokens counted from each sequence's start, head); block=1 gives per-token-per-head scales."""
    T = x.shape[0]
    bounds = [0, T] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    fmax = fp8_max(fp8_dtype)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for s in range(a, b, block):
            e = min(s + block, b)
            xf = x[s:e].float()  # [n, H, D]
            scale = xf.abs().amax(dim=(0, 2)).clamp_min(AMAX_FLOOR) / fmax  # [H]
            qv = (xf / scale[None, :, None]).clamp(-fmax, fmax).to(fp8_dtype)
            out[s:e] = qv.float() * scale[None, :, None]
    return out


def prefill_attention_fp8_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, cu_seqlens: torch.Tensor | None = None,
    scale_block: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> torch.Tensor:
    """What prefill_attention.prefill_attention_fp8 computes, but for P's FP8 rounding: q quantized per token
    per head, k and v per (scale_block tokens, head), then exact float32 causal attention → float32."""
    qd = quantize_blocks_ref(q, 1, fp8_dtype, cu_seqlens)
    kd = quantize_blocks_ref(k, scale_block, fp8_dtype, cu_seqlens)
    vd = quantize_blocks_ref(v, scale_block, fp8_dtype, cu_seqlens)
    return causal_attention_ref(qd, kd, vd, sm_scale, cu_seqlens)

"""Decode attention over the paged KV cache (FP8 with per-token-per-head scales, or bf16), fp32 accumulation.

Contract:
    paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, sm_scale,
                           k_scale=None, v_scale=None, max_seq_len=None, num_splits=None) → out
      q:            [B, Hq, D] bf16/fp16 (one new token per sequence); Hq a multiple of Hkv (GQA)
      k/v_cache:    [num_blocks, block_size, Hkv, D] FP8 or bf16 (strides free, head_dim contiguous)
      k/v_scale:    [num_blocks, block_size, Hkv] float32, iff FP8
      block_table:  [B, max_blocks] int32; seq_lens: [B] int32, each ≥ 1 (tokens already in the cache,
                    the new token's K/V included)
      out:          [B, Hq, D] in q.dtype
Design (flash-decoding): grid (B, Hkv, num_splits). A program takes the GROUP query heads that share one KV
head (so each K/V byte is read once per sequence), walks its slice of the sequence BLOCK_T tokens at a time,
gathers pages through the block table and keeps an online softmax in float32. FP8 K/V are widened to fp16
(exact, one instruction per pair) and fed to fp16 tensor-core dots; K's per-token scale multiplies the QK
logits in fp32, V's is folded into P relative to the largest V scale seen so far, v_ref, in whose units the
accumulator is held (so the P·V dot accumulates in place: one fp32 tile per program, not two). bf16 KV uses bf16
dots. With more than one split a small second kernel merges the partial results by their log-sum-exp. The grid depends only on B and
num_splits, never on data, so the call is CUDA-graph safe when max_seq_len (or num_splits) is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels._common import FP8_MAX, check, check_same_device, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, len_ptr, out_ptr, lse_ptr, final_ptr,
    qk_scale, num_splits,
    stride_qb, stride_qh,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, PAGE: tl.constexpr, KV_FP8: tl.constexpr, DIRECT: tl.constexpr,
    OFF32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_T) * BLOCK_T
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    dmask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if KV_FP8:
        # fp16 operands: fp8 -> fp16 is one instruction per pair and exact; bf16 q -> fp16 is exact in range.
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    else:
        q = q.to(tl.bfloat16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    v_ref = tl.full([], 1e-30, tl.float32)  # FP8: acc is in units of the largest V scale so far (never decreases)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        page = tl.load(bt_ptr + b * stride_btb + t // PAGE, mask=tmask, other=0)
        page = page.to(tl.int32) if OFF32 else page.to(tl.int64)  # 32-bit offsets save registers
        slot_off = t % PAGE
        kv_off = page * stride_cb + slot_off * stride_ct + kvh * stride_ch
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + kv_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        if KV_FP8:
            s = tl.dot(q, tl.trans(k.to(tl.float16)))  # [BLOCK_G, BLOCK_T] fp32
            sc_off = page * stride_sb + slot_off * stride_st + kvh * stride_sh
            k_sc = tl.load(ks_ptr + sc_off, mask=tmask, other=0.0)
            s = s * (k_sc * qk_scale)[None, :]
        else:
            s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
            s = s * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + kv_off[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        if KV_FP8:
            # Fold V's per-token scale into P, relative to v_ref (the largest scale so far) so that the fp16 P
            # never overflows: P·diag(s)·V = v_ref · (P·diag(s / v_ref))·V. Each token's factor is rounded once
            # to fp16 (2^-11), far below the bf16 output rounding. A larger scale rescales acc by the ratio
            # (≤ 1) together with the softmax's alpha, so the dot accumulates in place (measured 255 -> 183
            # registers and 0.5-3% faster than adding a separately scaled dot; kernel_experiments/attn_fold_acc.py).
            v_sc = tl.load(vs_ptr + sc_off, mask=tmask, other=0.0)
            v_new = tl.maximum(v_ref, tl.max(v_sc, axis=0))
            pv = (p * (v_sc / v_new)[None, :]).to(tl.float16)
            acc = tl.dot(pv, v.to(tl.float16), acc * (alpha * (v_ref / v_new))[:, None])
            v_ref = v_new
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if KV_FP8:
        o = acc * (v_ref / l_safe)[:, None]
    else:
        o = acc / l_safe[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:
        tl.store(final_ptr + b * stride_fb + heads[:, None] * stride_fh + offs_d[None, :],
                 o.to(final_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 o, mask=omask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _attn_merge_kernel(
    out_ptr, lse_ptr, final_ptr, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    w = w / tl.sum(w, axis=0)
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
    res = tl.sum(o * w[:, None], axis=0)
    tl.store(final_ptr + b * stride_fb + h * stride_fh + offs_d, res.to(final_ptr.dtype.element_ty),
             mask=offs_d < D)


# (BLOCK_T, num_warps, num_stages, max registers or None) measured best on the H100 at batch 64, 2K
# context (bench_kernels.py --only attn_variants; NOTES.md): small one-warp programs, two splits.
ATTN_FP8_CONFIG = (32, 1, 2, None)
ATTN_BF16_CONFIG = (64, 2, 2, None)
MAX_SPLITS = 128


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_t: int, sm_count: int,
                      num_warps: int = 4) -> int:
    """About 2·SMs·(4 / num_warps) programs (small programs need more of them in flight to keep HBM busy),
    but no split shorter than 2 × BLOCK_T tokens and at most 128 splits. (Measured on the H100, FP8 KV, one-warp
    programs of 32 tokens: B=1 at 8K 18.2 µs with 64 splits, 15.1 with 128; at 2K 12.7 with 16, 9.9 with 32 —
    scripts/kernel_experiments/attn_small_batch.py. Batches of 16 and more never reach the caps.)"""
    target = 2 * sm_count * max(1, 4 // num_warps)
    want = max(1, round(target / max(1, batch * num_kv_heads)))
    cap = max(1, -(-max_seq_len // (2 * block_t)))
    return max(1, min(want, cap, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_regs: int | None = None,
    off32: bool = True,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV → [B, Hq, D] in q.dtype. See module doc."""
    check(q.dim() == 3 and q.stride(-1) == 1, f"q must be [B, Hq, D] with contiguous D, got {tuple(q.shape)}")
    B, Hq, D = q.shape
    check(k_cache.dim() == 4 and k_cache.shape[3] == D, f"k_cache must be [blocks, block_size, Hkv, {D}]")
    check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(),
          "v_cache must match k_cache in shape and strides")
    check(k_cache.stride(-1) == 1, "the cache's head_dim axis must be contiguous")
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    check(Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    check(block_table.dim() == 2 and block_table.shape[0] == B and not block_table.dtype.is_floating_point,
          f"block_table must be an integer [B={B}, max_blocks] tensor")
    check(seq_lens.shape == (B,) and not seq_lens.dtype.is_floating_point, f"seq_lens must be integer [{B}]")
    kv_fp8 = k_cache.dtype in FP8_MAX
    if kv_fp8:
        check(k_scale is not None and v_scale is not None and k_scale.shape == k_cache.shape[:3]
              and v_scale.stride() == k_scale.stride(), "an FP8 KV cache needs k_scale/v_scale [blocks, block_size, Hkv]")
    else:
        k_scale = v_scale = k_cache
    check_same_device(q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale)
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = Hq // Hkv
    cfg = ATTN_FP8_CONFIG if kv_fp8 else ATTN_BF16_CONFIG
    block_t = block_t or cfg[0]
    num_warps = num_warps or cfg[1]
    num_stages = num_stages or cfg[2]
    max_regs = max_regs or cfg[3]
    extra = {"maxnreg": max_regs} if max_regs and q.is_cuda else {}  # register cap → more programs per SM
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())  # host sync: pass max_seq_len under CUDA graph capture
        num_splits = choose_num_splits(B, Hkv, max_seq_len, block_t, _sm_count(q.device), num_warps)
    direct = num_splits == 1
    if direct:
        part, lse = out, out  # unused
        so = (0, 0, 0)
        sl = (0, 0)
    else:
        part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
        so = (part.stride(0), part.stride(1), part.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    block_d = next_pow2(D)
    _attn_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, part, lse, out,
        float(sm_scale) * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2) if kv_fp8 else 0, block_table.stride(0),
        *so, *sl, out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), D=D, BLOCK_D=block_d,
        BLOCK_T=block_t, PAGE=page, KV_FP8=kv_fp8, DIRECT=direct, num_warps=num_warps, num_stages=num_stages,
        OFF32=max(k_cache.numel(), k_scale.numel()) < 2**31 if off32 else False, **extra,
    )
    if not direct:
        _attn_merge_kernel[(B, Hq)](
            part, lse, out, num_splits, *so, *sl, out.stride(0), out.stride(1),
            D=D, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(num_splits)), num_warps=4,
        )
    return out

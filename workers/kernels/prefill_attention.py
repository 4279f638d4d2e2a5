"""FP8 causal prefill attention (flash-attention forward, Triton): Q, K, V in FP8 E4M3, fp32 softmax.

Contract:
    prefill_attention_fp8(q, k, v, sm_scale, cu_seqlens=None, max_seqlen=None, ...) → out
      q:          [T, Hq, D] bf16/fp16 (rotated), k, v: [T, Hkv, D]; Hq a multiple of Hkv (GQA); D a power of
                  two in 32..256; last dim contiguous, other strides free
      cu_seqlens: None (one sequence of T tokens) or [B+1] int32 on q's device, packed sequences
                  (cu[0] = 0, cu[B] = T); then max_seqlen (host int ≥ every length) is required
      out:        [T, Hq, D] in q.dtype; token t of sequence b attends to tokens cu[b]..t (causal)
Two launches:
  1. `quantize_kv_for_attention`: k and v per (block of SB tokens, head), `scale = max(amax, 1e-12) / 448`,
     written to internal buffers in which every sequence starts at a multiple of SB and its tail is
     zero-padded (so the attention kernel loads full key tiles without masks); v is stored transposed
     ([Hkv, D, T]) so both FP8 tensor-core products read K-major operands.
  2. `_attn_fwd_kernel`: grid (query tiles, Hq, B). A program loads its BLOCK_M queries of one head once
     (bf16) and quantizes them per token (scale as above), then walks the keys BLOCK_N at a time (pointer
     loads or TMA descriptors) with an online softmax in float32. Because K and V scales are constant over a
     tile, no per-element scale work is added to the loop: the K scale joins the per-row factor that turns
     raw logits into log2 units, and the V scale is folded into the accumulator's per-row rescale
     (acc holds O · l / s_v of the last tile). P = exp2(logit − max + 8) ∈ [0, 256] is cast to FP8 E4M3 with
     that fixed 2^8 scale (the same factor is in the row sum l, so it cancels) and multiplied with V in FP8.
Error vs bf16 attention of the unquantized inputs: measured and stated in workers/kernels/NOTES.md.
Bad input raises KernelInputError. Not graph-safe with cu_seqlens (the padded offsets are computed with
torch ops; no host sync).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from workers.kernels._common import AMAX_FLOOR, FP8_MAX, check, check_same_device

try:  # host-side TMA descriptors (triton ≥ 3.4); without them the pointer path is used
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LOG2E = 1.4426950408889634
P_SHIFT = 8.0  # P is stored as exp2(... + 8) ≤ 256 < 448: FP8 range used down to 2^-17 of the row max

# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA descriptors, QKᵀ issued a tile ahead) — measured best on the
# H100 at 8192 tokens (bench_kernels.py --only prefill_attn --attn-sweep); SCALE_BLOCK must be a multiple of
# both tiles.
FWD_CONFIG = (64, 64, 4, 3, True, False)
SCALE_BLOCK = 128
# Lazy rescaling (`_softmax_pv_lazy`): the running max is raised only when a tile's max exceeds it by more than
# LAZY_TAU (log2 units), and P's fixed scale drops to 2^(8 − LAZY_TAU) so that P ≤ 2^8 still fits E4M3.
# Measured slower on the H100 (8192 tokens: 1.144 ms vs 0.894 ms eager, same run; NOTES.md), so off by default.
# A module switch (read at each call) so the benchmarks can compare both in one run.
LAZY_RESCALE = False
LAZY_TAU = 3.0
# Below this many tokens bf16 SDPA (cuDNN) measured as fast or faster on the H100 (4096 tokens: 1.05x its time,
# 8192: 0.92x; our two launches also cost ~170 us of host time vs ~33 us): callers that choose per prompt (the
# engine adapter, the 8B bench stack) use SDPA below it. NOTES.md has the figures.
MIN_TOKENS = 8192


@triton.jit
def _quant_tile(src_ptr, stride_st, stride_sh, h, s0, blk, seq_len,
                dst_ptr, stride_dt, stride_dh, stride_dd, p0, scale_ptr, stride_scale,
                D: tl.constexpr, SB: tl.constexpr, TRANSPOSED: tl.constexpr,
                FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr):
    """Quantize one [SB tokens, D] tile of one head with one scale; store it (transposed for V) and the scale."""
    rows = blk * SB + tl.arange(0, SB)  # token index inside the sequence
    offs_d = tl.arange(0, D)
    x = tl.load(src_ptr + (s0 + rows.to(tl.int64))[:, None] * stride_st + h * stride_sh + offs_d[None, :],
                mask=(rows < seq_len)[:, None], other=0.0).to(tl.float32)
    prow = p0 + rows.to(tl.int64)  # padded row
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), AMAX_MIN) / FP8_MAX  # scalar
    y = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(scale_ptr + h * stride_scale + (p0 // SB) + blk, scale)
    y = y.to(dst_ptr.dtype.element_ty)
    if TRANSPOSED:
        tl.store(dst_ptr + h * stride_dh + offs_d[None, :] * stride_dd + prow[:, None], y)
    else:
        tl.store(dst_ptr + prow[:, None] * stride_dt + h * stride_dh + offs_d[None, :], y)


@triton.jit
def _quant_kv_kernel(
    k_ptr, v_ptr, cu_ptr, pcu_ptr, k8_ptr, vt8_ptr, ks_ptr, vs_ptr,
    T, HKV, stride_kt, stride_kh, stride_vt, stride_vh, stride_k8t, stride_k8h, stride_vt8h, stride_vt8d, stride_ksh,
    D: tl.constexpr, SB: tl.constexpr, VARLEN: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr,
):
    blk = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        seq_len = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)  # int32 (TMA coordinates are 32-bit)
        s0 = tl.load(cu_ptr + b).to(tl.int64)
        p0 = tl.load(pcu_ptr + b).to(tl.int64)
    else:
        s0 = 0
        seq_len = T
        p0 = 0
    if blk * SB < seq_len:
        if head < HKV:
            _quant_tile(k_ptr, stride_kt, stride_kh, head, s0, blk, seq_len, k8_ptr, stride_k8t, stride_k8h,
                        0, p0, ks_ptr, stride_ksh, D, SB, False, FP8_MAX, AMAX_MIN)
        else:
            _quant_tile(v_ptr, stride_vt, stride_vh, head - HKV, s0, blk, seq_len, vt8_ptr, 0, stride_vt8h,
                        stride_vt8d, p0, vs_ptr, stride_ksh, D, SB, True, FP8_MAX, AMAX_MIN)


@triton.jit
def _qk(q, k_ptrs, k_src, row0, kv_d0, start_n, USE_TMA: tl.constexpr):
    """Raw logits of one key tile: q [BLOCK_M, D] fp8 · k [BLOCK_N, D]ᵀ fp8 → fp32 [BLOCK_M, BLOCK_N].
    k_src: the K descriptor (TMA path) or K's token stride (pointer path)."""
    if USE_TMA:
        k = k_src.load([row0 + start_n, kv_d0])  # bulk copy engine
    else:
        k = tl.load(k_ptrs + start_n * k_src)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _softmax_pv(s, acc, l_i, m_i, vs_prev, q_row, vt_ptrs, vt_desc, row0, kv_d0, ks_ptr, vs_ptr, start_n,
                offs_m, offs_n, MASKED: tl.constexpr, SB: tl.constexpr, SHIFT: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Online-softmax update with the raw logits s of key tile start_n, then acc += P·V (FP8 P, FP8 V)."""
    r = q_row * tl.load(ks_ptr + start_n // SB)  # [BLOCK_M]: q scale · k scale · sm_scale · log2(e)
    if MASKED:
        causal = offs_m[:, None] >= (start_n + offs_n)[None, :]
        s = tl.where(causal, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * r)
    p = tl.math.exp2(s * r[:, None] - (m_new - SHIFT)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vs = tl.load(vs_ptr + start_n // SB)
    acc = acc * (alpha * (vs_prev / vs))[:, None]  # acc now in units of this tile's V scale
    if USE_TMA:
        vt = vt_desc.load([kv_d0, row0 + start_n])  # [D, BLOCK_N] fp8 (tokens contiguous)
    else:
        vt = tl.load(vt_ptrs + start_n)
    acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc)
    return acc, l_i, m_new, vs


@triton.jit
def _softmax_pv_lazy(s, acc, l_i, m_i, q_row, vt_ptrs, vt_desc, row0, kv_d0, ks_ptr, vs_ptr, start_n,
                     offs_m, offs_n, MASKED: tl.constexpr, SB: tl.constexpr, SHIFT: tl.constexpr,
                     TAU: tl.constexpr, USE_TMA: tl.constexpr):
    """`_softmax_pv` with lazy rescaling: the V scale is a per-tile bias of the exponent (P ∝ w · s_v, and the
    row sum adds ΣP / s_v), so acc needs no per-tile V rescale; the running max m (of logit + log2 s_v) is only
    raised — and acc, l rescaled, for the whole tile at once — when some row's tile max exceeds it by more
    than TAU. A stale max lets P reach 2^(SHIFT + TAU), which the caller keeps ≤ 2^8 < 448."""
    r = q_row * tl.load(ks_ptr + start_n // SB)  # [BLOCK_M]: q scale · k scale · sm_scale · log2(e)
    vs = tl.load(vs_ptr + start_n // SB)
    bv = tl.math.log2(vs)
    if MASKED:
        causal = offs_m[:, None] >= (start_n + offs_n)[None, :]
        s = tl.where(causal, s, float("-inf"))
    m_tile = tl.max(s, axis=1) * r + bv
    if tl.sum((m_tile > m_i + TAU).to(tl.int32), axis=0) > 0:  # rare after the first tiles
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.math.exp2(s * r[:, None] - (m_i - SHIFT - bv)[:, None])
    l_i = l_i + tl.sum(p, axis=1) * (1.0 / vs)
    if USE_TMA:
        vt = vt_desc.load([kv_d0, row0 + start_n])  # [D, BLOCK_N] fp8 (tokens contiguous)
    else:
        vt = tl.load(vt_ptrs + start_n)
    acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, vt_ptr, ks_ptr, vs_ptr, out_ptr, cu_ptr, pcu_ptr, k_desc, vt_desc,
    T, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vh, stride_vd, stride_ksh, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SB: tl.constexpr,
    VARLEN: tl.constexpr, SHIFT: tl.constexpr, USE_TMA: tl.constexpr, PIPE: tl.constexpr,
    FP8_MAX: tl.constexpr, AMAX_MIN: tl.constexpr, LAZY: tl.constexpr, TAU: tl.constexpr,
):
    # Longest query tiles first: program 0 takes the last tile (most keys), so the tail of the grid is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        seq_len = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)  # int32 (TMA coordinates are 32-bit)
        s0 = tl.load(cu_ptr + b).to(tl.int64)
        p0 = tl.load(pcu_ptr + b).to(tl.int64)
    else:
        s0 = 0
        seq_len = T
        p0 = 0
    start_m = pid_m * BLOCK_M
    if start_m < seq_len:
        kvh = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        # Q is read once per program (bf16) and quantized here, per token per head: no separate pass over Q.
        qb = tl.load(q_ptr + (s0 + offs_m.to(tl.int64))[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                     mask=(offs_m < seq_len)[:, None], other=0.0).to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(qb), axis=1), AMAX_MIN) / FP8_MAX
        q = tl.clamp(tl.math.div_rn(qb, q_scale[:, None]), -FP8_MAX, FP8_MAX).to(k_ptr.dtype.element_ty)
        q_row = q_scale * qk_scale
        row0 = p0.to(tl.int32)
        k_ptrs = k_ptr + (p0 + offs_n)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        vt_ptrs = vt_ptr + kvh * stride_vh + offs_d[:, None] * stride_vd + (p0 + offs_n)[None, :]
        ks_row = ks_ptr + kvh * stride_ksh + p0 // SB
        vs_row = vs_ptr + kvh * stride_ksh + p0 // SB
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        vs_prev = tl.load(vs_row)
        kx = k_desc if USE_TMA else stride_kt  # what _qk needs to address a key tile
        kvd = kvh * D
        diag0 = start_m // BLOCK_N * BLOCK_N  # first key tile that reaches the diagonal (BLOCK_N may exceed BLOCK_M)
        if LAZY:  # lazy rescaling (see _softmax_pv_lazy); no PIPE variant
            for start_n in range(0, diag0, BLOCK_N):
                s = _qk(q, k_ptrs, kx, row0, kvd, start_n, USE_TMA)
                acc, l_i, m_i = _softmax_pv_lazy(s, acc, l_i, m_i, q_row, vt_ptrs, vt_desc, row0, kvd, ks_row,
                                                 vs_row, start_n, offs_m, offs_n, False, SB, SHIFT, TAU, USE_TMA)
        elif PIPE:  # the next tile's QKᵀ is issued before this tile's softmax (overlap on the tensor cores)
            if diag0 > 0:
                s = _qk(q, k_ptrs, kx, row0, kvd, 0, USE_TMA)
                for start_n in range(0, diag0 - BLOCK_N, BLOCK_N):
                    s_next = _qk(q, k_ptrs, kx, row0, kvd, start_n + BLOCK_N, USE_TMA)
                    acc, l_i, m_i, vs_prev = _softmax_pv(s, acc, l_i, m_i, vs_prev, q_row, vt_ptrs, vt_desc, row0,
                                                         kvd, ks_row, vs_row, start_n, offs_m, offs_n, False, SB,
                                                         SHIFT, USE_TMA)
                    s = s_next
                acc, l_i, m_i, vs_prev = _softmax_pv(s, acc, l_i, m_i, vs_prev, q_row, vt_ptrs, vt_desc, row0, kvd,
                                                     ks_row, vs_row, diag0 - BLOCK_N, offs_m, offs_n, False, SB,
                                                     SHIFT, USE_TMA)
        else:
            for start_n in range(0, diag0, BLOCK_N):  # key tiles wholly before this query tile: no mask
                s = _qk(q, k_ptrs, kx, row0, kvd, start_n, USE_TMA)
                acc, l_i, m_i, vs_prev = _softmax_pv(s, acc, l_i, m_i, vs_prev, q_row, vt_ptrs, vt_desc, row0, kvd,
                                                     ks_row, vs_row, start_n, offs_m, offs_n, False, SB, SHIFT,
                                                     USE_TMA)
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
        for start_n in range(diag0, hi, BLOCK_N):  # tiles that cross the diagonal: causal mask
            s = _qk(q, k_ptrs, kx, row0, kvd, start_n, USE_TMA)
            if LAZY:
                acc, l_i, m_i = _softmax_pv_lazy(s, acc, l_i, m_i, q_row, vt_ptrs, vt_desc, row0, kvd, ks_row,
                                                 vs_row, start_n, offs_m, offs_n, True, SB, SHIFT, TAU, USE_TMA)
            else:
                acc, l_i, m_i, vs_prev = _softmax_pv(s, acc, l_i, m_i, vs_prev, q_row, vt_ptrs, vt_desc, row0,
                                                     kvd, ks_row, vs_row, start_n, offs_m, offs_n, True, SB,
                                                     SHIFT, USE_TMA)
        if LAZY:
            o = acc / l_i[:, None]
        else:
            o = acc * (vs_prev / l_i)[:, None]
        tl.store(out_ptr + (s0 + offs_m.to(tl.int64))[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(offs_m < seq_len)[:, None])


def _full_config(config: tuple | None) -> tuple[int, int, int, int, bool, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, use_tma, pipe]) → all six; TANDEM_FP8_ATTN_CONFIG
    ("128,128,8,3,1,0") overrides the default (not an explicit config)."""
    env = os.environ.get("TANDEM_FP8_ATTN_CONFIG")
    if config is None and env:
        config = tuple(int(x) for x in env.split(","))
    c = tuple(config or FWD_CONFIG)
    check(len(c) in (4, 6), f"config must be (BLOCK_M, BLOCK_N, warps, stages[, tma, pipe]), got {c}")
    c = c[:4] + tuple(bool(x) for x in c[4:])
    return (*c, False, False) if len(c) == 4 else c  # type: ignore[return-value]


class KV8:
    """The quantized, padded K/V of one attention call (see the module docstring)."""

    def __init__(self, k8, vt8, k_scale, v_scale, pcu, sb):  # type: ignore[no-untyped-def]
        self.k8, self.vt8 = k8, vt8  # [Tp, Hkv, D], [Hkv, D, Tp]
        self.k_scale, self.v_scale = k_scale, v_scale  # [Hkv, Tp / SB] each
        self.pcu = pcu  # [B] padded start of each sequence, or None for one sequence
        self.sb = sb


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    check(q.dim() == 3 and k.dim() == 3 and v.shape == k.shape, "q must be [T, Hq, D], k and v [T, Hkv, D]")
    T, Hq, D = q.shape
    check(k.shape[0] == T and k.shape[2] == D, f"k/v must be [{T}, Hkv, {D}], got {tuple(k.shape)}")
    Hkv = k.shape[1]
    check(Hkv > 0 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    check(D in (32, 64, 128, 256), f"head_dim must be 32, 64, 128 or 256, got {D}")
    check(q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype == v.dtype,
          f"q, k, v must share a bf16/fp16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "the head_dim axis must be contiguous")
    check_same_device(q, k, v)
    return T, Hq, Hkv, D


def _padded_starts(cu_seqlens: torch.Tensor, sb: int) -> torch.Tensor:
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    padded = (lens + sb - 1) // sb * sb
    return torch.cumsum(padded, 0).sub_(padded).to(torch.int32)  # exclusive prefix sum


def quantize_kv_for_attention(
    k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    sb: int = SCALE_BLOCK, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> KV8:
    """Launch 1 of the module docstring: k, v [T, Hkv, D] → FP8 operands with their block scales, one launch."""
    check(k.dim() == 3 and v.shape == k.shape and k.stride(-1) == 1 == v.stride(-1), "k, v must be [T, Hkv, D]")
    T, Hkv, D = k.shape
    check(fp8_dtype in FP8_MAX, f"fp8_dtype must be an FP8 dtype, got {fp8_dtype}")
    check(sb >= 16 and sb & (sb - 1) == 0, f"the scale block must be a power of two ≥ 16, got {sb}")
    if cu_seqlens is None:
        B, max_len, Tp, pcu = 1, T, -(-T // sb) * sb, None
    else:
        check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and cu_seqlens.dtype == torch.int32,
              "cu_seqlens must be int32 [B+1]")
        check(max_seqlen is not None and max_seqlen >= 0, "cu_seqlens needs max_seqlen (an int ≥ every length)")
        check_same_device(k, cu_seqlens)
        B, max_len = cu_seqlens.numel() - 1, int(max_seqlen)
        Tp = -(-T // sb) * sb + B * sb  # an upper bound of the padded total (no host sync)
        pcu = _padded_starts(cu_seqlens, sb)
    dev = k.device
    k8 = torch.empty(Tp, Hkv, D, device=dev, dtype=fp8_dtype)
    vt8 = torch.empty(Hkv, D, Tp, device=dev, dtype=fp8_dtype)
    ks = torch.empty(Hkv, Tp // sb, device=dev, dtype=torch.float32)
    vs = torch.empty_like(ks)
    n_blk = -(-max_len // sb)
    if T > 0 and n_blk > 0:
        cu = cu_seqlens if cu_seqlens is not None else ks
        _quant_kv_kernel[(n_blk, 2 * Hkv, B)](
            k, v, cu, pcu if pcu is not None else ks, k8, vt8, ks, vs,
            T, Hkv, k.stride(0), k.stride(1), v.stride(0), v.stride(1), k8.stride(0), k8.stride(1),
            vt8.stride(0), vt8.stride(1), ks.stride(0),
            D=D, SB=sb, VARLEN=cu_seqlens is not None, FP8_MAX=FP8_MAX[fp8_dtype], AMAX_MIN=AMAX_FLOOR,
            num_warps=4,
        )
    return KV8(k8, vt8, ks, vs, pcu, sb)


def attention_fp8_quantized(
    q: torch.Tensor, kv: KV8, out: torch.Tensor, sm_scale: float, cu_seqlens: torch.Tensor | None,
    max_seqlen: int, config: tuple | None = None,
) -> torch.Tensor:
    """Launch 2 of the module docstring: q [T, Hq, D] (bf16, quantized in the kernel) against `kv` → out."""
    block_m, block_n, num_warps, num_stages, use_tma, pipe = _full_config(config)
    check(kv.sb % block_m == 0 and kv.sb % block_n == 0 and (block_m % block_n == 0 or block_n % block_m == 0),
          f"the scale block ({kv.sb}) must be a multiple of BLOCK_M ({block_m}) and BLOCK_N ({block_n}), "
          "and one tile a multiple of the other")
    use_tma = use_tma and TensorDescriptor is not None
    T, Hq, D = q.shape
    Hkv = kv.k8.shape[1]
    B = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    n_m = -(-max_seqlen // block_m)
    if T == 0 or n_m == 0:
        return out
    dummy = kv.k_scale
    if use_tma:  # descriptors over the 2-D views [Tp, Hkv·D] (k) and [Hkv·D, Tp] (v transposed)
        Tp = kv.k8.shape[0]
        descs = (TensorDescriptor.from_tensor(kv.k8.view(Tp, Hkv * D), [block_n, D]),
                 TensorDescriptor.from_tensor(kv.vt8.view(Hkv * D, Tp), [D, block_n]))
    else:
        descs = (dummy, dummy)
    fp8_dtype = kv.k8.dtype
    _attn_fwd_kernel[(n_m, Hq, B)](
        q, kv.k8, kv.vt8, kv.k_scale, kv.v_scale, out,
        cu_seqlens if cu_seqlens is not None else dummy, kv.pcu if kv.pcu is not None else dummy, *descs,
        T, float(sm_scale) * _LOG2E,
        q.stride(0), q.stride(1), kv.k8.stride(0), kv.k8.stride(1), kv.vt8.stride(0), kv.vt8.stride(1),
        kv.k_scale.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, D=D, BLOCK_M=block_m, BLOCK_N=block_n, SB=kv.sb, VARLEN=cu_seqlens is not None,
        SHIFT=P_SHIFT - LAZY_TAU if LAZY_RESCALE else P_SHIFT, USE_TMA=use_tma, PIPE=pipe and not LAZY_RESCALE,
        FP8_MAX=FP8_MAX[fp8_dtype], AMAX_MIN=AMAX_FLOOR, LAZY=LAZY_RESCALE, TAU=LAZY_TAU,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    config: tuple | None = None, sb: int | None = None,
) -> torch.Tensor:
    """Causal attention with FP8 Q/K/V/P and fp32 softmax → [T, Hq, D] in q.dtype. See the module docstring."""
    T = _check_qkv(q, k, v)[0]
    sb = sb or max(SCALE_BLOCK, *_full_config(config)[:2])
    kv = quantize_kv_for_attention(k, v, cu_seqlens, max_seqlen, sb)
    out = torch.empty_like(q)
    return attention_fp8_quantized(q, kv, out, sm_scale, cu_seqlens, T if cu_seqlens is None else int(max_seqlen),
                                   config)

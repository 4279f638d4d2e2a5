"""Registers this package's kernels as the engine's "triton" ops backend for CUDA devices.

`workers.engine.ops.get_ops("cuda")` imports this module, which registers adapters from the engine's op
signatures (workers/engine/ops.py docstring) to the kernels. Ops the engine seam has but we leave to the
reference: `prefill_attention` (torch SDPA is already a flash kernel on CUDA; bf16 engines keep it).
`prefill_attention_fp8` (used by the model when its linears are FP8) is `prefill_attention.prefill_attention_fp8`
(FP8 Q/K/V/P, fp32 softmax) where the shape fits it (bf16/fp16, head_dim 32..256) and the prompt has at least
`prefill_attention.MIN_TOKENS` tokens (shorter ones run faster in SDPA), else the reference. `rope_kv_write` (RoPE + K/V
quantize-and-write in one launch) and the residual-fused norms (`add_rms_norm`, `add_rms_norm_quant`) fill
the seam's decode slots; `prefill_rope_kv` is the same launch for prefill (k also to a buffer for the
attention, the cache written only for a colocated prefill). `prepare_fp8_weight` tile-packs the weights whose decode
GEMM measured faster that way (configs.PACKED_SHAPES: Llama-8B's down projection) on GPUs with TMA. Registered `graph_safe`: none of these adapters synchronises with the host (the
attention bounds lengths by the block table's width) and the KV writes skip slot -1, so the engine captures
decode steps in CUDA graphs.

If Triton is missing, nothing is registered and the engine keeps its torch reference ops.
"""

from __future__ import annotations

import os

import torch

from orchestrator.core.types import KVDtype

try:
    from workers.engine import ops as _ops
    from workers.engine.fp8 import kv_storage_dtype
    from workers.kernels import configs as _configs
    from workers.kernels import prefill_attention as _pa
    from workers.kernels.attention import paged_decode_attention as _attn
    from workers.kernels.gemm import TensorDescriptor as _TensorDescriptor
    from workers.kernels.gemm import fp8_linear as _fp8_linear
    from workers.kernels.kv_cache import kv_write as _kv_write
    from workers.kernels.kv_cache import rope_kv_write as _rope_kv_write
    from workers.kernels.packed_weight import pack_weight as _pack_weight
    from workers.kernels.prefill_attention import prefill_attention_fp8 as _prefill_fp8
    from workers.kernels.quant import quantize_per_token, rms_norm_quant, silu_mul_quant
except ImportError:  # no triton (or no engine): leave the reference ops in place
    _ops = None

BACKEND_NAME = "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, h] → [T, h] in x.dtype (normalization in float32, one rounding at the end)."""
    return rms_norm_quant(x, weight, eps, None)[0]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_mul_quant(gate_up, None)[0]


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_per_token(x, fp8_dtype)
    return q, s.unsqueeze(-1)


def rms_norm_quant_op(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8_dtype: torch.dtype):
    q, s, _ = rms_norm_quant(x, weight, eps, fp8_dtype)
    return q, s.unsqueeze(-1)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):  # type: ignore[no-untyped-def]
    """(rms_norm(residual + x), residual + x), one launch."""
    y, _, h = rms_norm_quant(x, weight, eps, None, residual=residual)
    return y, h


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8_dtype: torch.dtype):  # type: ignore[no-untyped-def]
    q, s, h = rms_norm_quant(x, weight, eps, fp8_dtype, residual=residual)
    return q, s.unsqueeze(-1), h


def rope_kv_write(qkv, positions, inv_freq, num_heads, slots, k_cache, v_cache, k_scale, v_scale,  # type: ignore[no-untyped-def]
                  kv_dtype: KVDtype):
    """Engine signature → kernels.rope_kv_write (angles and rotation in float32, one launch)."""
    d = k_cache.shape[3]
    if d % 2 or d & (d - 1) or qkv.stride(-1) != 1:  # the kernel needs a power-of-two head_dim
        return _ops.rope_kv_write(qkv, positions, inv_freq, num_heads, slots, k_cache, v_cache, k_scale, v_scale,
                                  kv_dtype)
    return _rope_kv_write(qkv, positions, inv_freq.float(), num_heads, slots, k_cache, v_cache, k_scale, v_scale)


def prefill_rope_kv(qkv, positions, inv_freq, num_heads, caches, slots, kv_dtype):  # type: ignore[no-untyped-def]
    """Engine signature → one `rope_kv_write` launch: q rotated, k rotated into a [T, Hk, D] buffer (k_out) and,
    with `caches`, K/V quantized into the cache at `slots`. The kernel rounds k to the activation dtype before
    quantizing, so the cache holds exactly `quantize_kv(k)`, `quantize_kv(v)` (this module's, one launch each)
    of the k, v returned: the export path (which quantizes what it is handed) stores identical bytes.
    Without caches (export, logits only) the writes are skipped (slot -1) into a one-slot dummy cache.
    Head dims the kernel does not take, or a strided qkv, use the reference op."""
    d = inv_freq.shape[0] * 2
    hk = (qkv.shape[1] // d - num_heads) // 2
    if d % 2 or d & (d - 1) or qkv.stride(-1) != 1 or qkv.dim() != 2:
        return _ops.prefill_rope_kv(qkv, positions, inv_freq, num_heads, caches, slots, kv_dtype)
    T = qkv.shape[0]
    k_out = torch.empty(T, hk, d, dtype=qkv.dtype, device=qkv.device)
    if caches is None:
        dummy = torch.empty(1, 1, hk, d, dtype=qkv.dtype, device=qkv.device)
        caches, slots = (dummy, dummy, None, None), torch.full((T,), -1, dtype=torch.int64, device=qkv.device)
    kc, vc, ks, vs = caches
    q = _rope_kv_write(qkv, positions, inv_freq.float(), num_heads, slots, kc, vc, ks, vs, k_out=k_out)
    v = qkv[:, (num_heads + hk) * d:].reshape(T, hk, d).contiguous()
    return q, k_out, v


def quantize_kv(x: torch.Tensor, kv_dtype: KVDtype):  # type: ignore[no-untyped-def]
    """Prefill KV [T, Hk, D] → (fp8 [T, Hk, D], scales [T, Hk]) in one launch; bf16 KV is a plain cast."""
    kv_dtype = KVDtype(kv_dtype)
    if not kv_dtype.is_fp8:
        return _ops.REFERENCE_OPS.quantize_kv(x, kv_dtype)
    return quantize_per_token(x, kv_storage_dtype(kv_dtype))


def silu_mul_quant_op(gate_up: torch.Tensor, fp8_dtype: torch.dtype):
    q, s = silu_mul_quant(gate_up, fp8_dtype)
    return q, s.unsqueeze(-1)


def fp8_linear(q, x_scale, w_q, w_scale, w_q_compute, bias, out_dtype):  # type: ignore[no-untyped-def]
    """Engine signature: scales may be per-tensor ([1]) or row-wise ([T, 1] / [N]); bias added after."""
    T, N = q.shape[0], w_q.shape[0]
    a_s = x_scale.reshape(-1).float().expand(T).contiguous()
    w_s = w_scale.reshape(-1).float().expand(N).contiguous()
    y = _fp8_linear(q if q.stride(-1) == 1 else q.contiguous(), a_s, w_q, w_s, out_dtype)
    return y if bias is None else y + bias


def prepare_fp8_weight(w_q: torch.Tensor):  # type: ignore[no-untyped-def]
    """Tile-pack the weights of `configs.PACKED_SHAPES` on GPUs with TMA (sm_90+), where the decode GEMM streams
    them faster (packed_weight.py); every other weight stays row-major. fp8_linear takes either."""
    tile = _configs.packed_tile(*w_q.shape)
    if tile is None or w_q.dtype != torch.float8_e4m3fn or _TensorDescriptor is None:
        return w_q
    if w_q.is_cuda and torch.cuda.get_device_capability(w_q.device)[0] < 9:
        return w_q  # no TMA
    if not w_q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return w_q  # CPU engines run the reference GEMM
    return _pack_weight(w_q, *tile)


def paged_attention_decode(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, sm_scale):  # type: ignore[no-untyped-def]
    # The table's width bounds every sequence's length without a host sync, so this is graph-capturable.
    max_len = block_tables.shape[1] * k_cache.shape[1]
    return _attn(q.contiguous(), k_cache, v_cache, block_tables, context_lens, sm_scale, k_scale, v_scale,
                 max_seq_len=max_len)


def prefill_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Engine signature (one sequence, causal) → the FP8 flash kernel; torch SDPA where the kernel does not fit."""
    fits = (q.shape[-1] in (32, 64, 128, 256) and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype == v.dtype and q.shape[1] % k.shape[1] == 0 and q.shape[0] >= _pa.MIN_TOKENS)
    if not fits:
        return _ops.prefill_attention(q, k, v, sm_scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _prefill_fp8(q, k, v, sm_scale)


def kv_write(k_cache, v_cache, k_scale, v_scale, slots, k, v, kv_dtype: KVDtype) -> None:  # type: ignore[no-untyped-def]
    _kv_write(k, v, slots, k_cache, v_cache, k_scale, v_scale)


IMPLS = {
    "rms_norm": rms_norm,
    "silu_mul": silu_mul,
    "quantize_rows": quantize_rows,
    "rms_norm_quant": rms_norm_quant_op,
    "silu_mul_quant": silu_mul_quant_op,
    "fp8_linear": fp8_linear,
    "paged_attention_decode": paged_attention_decode,
    "kv_write": kv_write,
    "add_rms_norm": add_rms_norm,
    "add_rms_norm_quant": add_rms_norm_quant,
    "rope_kv_write": rope_kv_write,
    "prefill_rope_kv": prefill_rope_kv,
    "quantize_kv": quantize_kv,
    "prefill_attention_fp8": prefill_attention_fp8,
    "prepare_fp8_weight": prepare_fp8_weight,
}


def register(device_type: str = "cuda", priority: int = 10) -> bool:
    """Register the adapters with the engine's op registry; False when Triton or the engine is missing."""
    if _ops is None:
        return False
    _ops.register_backend(BACKEND_NAME, IMPLS, device_type=device_type, priority=priority, graph_safe=True)
    return True


register()

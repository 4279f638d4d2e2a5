"""The engine's hot ops behind one seam, with torch reference implementations.

The model calls only `Ops` members. `get_ops(device)` returns the reference torch ops, with any op
replaced by a faster backend registered for that device type. The kernels package plugs in like this
(`workers/kernels` owns that code; the engine never launches a kernel itself):

    from workers.engine import ops
    ops.register_backend("triton", {"rms_norm": my_rms_norm, "paged_attention_decode": my_attn},
                         device_type="cuda", priority=10)

On a CUDA device, `get_ops` first imports `workers.kernels.engine_backend` if it exists (that module
registers itself on import), then picks the registered backend with the highest priority. Ops a
backend leaves out fall back to the reference. `EngineConfig.ops_backend="reference"` forces torch.

Signatures (shapes in comments; T tokens, H query heads, Hk KV heads, D head dim):
    rms_norm(x [T, h], weight [h], eps) -> [T, h]                      (x's dtype; math in float32)
    silu_mul(gate_up [T, 2I]) -> [T, I]
    quantize_rows(x [T, K], fp8_dtype) -> (q [T, K], scale [T, 1])     (round-to-nearest, dynamic)
    rms_norm_quant(x [T, h], weight [h], eps, fp8_dtype) -> (q [T, h], scale [T, 1])   (fused producer)
    add_rms_norm(x [T, h], residual [T, h], weight [h], eps) -> (y [T, h], h_new [T, h])
        (h_new = residual + x in x's dtype, y = rms_norm(h_new): the residual add fused into the norm)
    add_rms_norm_quant(x, residual, weight, eps, fp8_dtype) -> (q [T, h], scale [T, 1], h_new [T, h])
    silu_mul_quant(gate_up [T, 2I], fp8_dtype) -> (q [T, I], scale [T, 1])             (fused producer)
    fp8_linear(q [T, K], x_scale [T, 1] | [1], w_q [N, K], w_scale [N] | [1], w_q_compute [N, K] | None,
               bias [N] | None, out_dtype) -> [T, N]
    prepare_fp8_weight(w_q [N, K]) -> w                                (once per weight, at load: dynamic FP8 linears
        pass w, not w_q, to fp8_linear afterwards; w may be a backend-specific layout with .shape (N, K), .dtype and
        .device, e.g. a tile-packed weight. The reference returns w_q.)
    prefill_attention(q [T, H, D], k [T, Hk, D], v [T, Hk, D], sm_scale) -> [T, H, D]    (causal)
    prefill_attention_fp8(q, k, v, sm_scale) -> [T, H, D]    (optional; None in the reference table)
        (the same causal attention, computed with FP8 operands: the model uses it instead of
        prefill_attention when its linear layers are FP8, if the backend has one; error budget as FP8 linears)
    paged_attention_decode(q [B, H, D], k_cache [NB, bs, Hk, D], v_cache, k_scale [NB, bs, Hk] | None,
                           v_scale, block_tables [B, max_blocks] int64, context_lens [B] int64,
                           sm_scale) -> [B, H, D]
    kv_write(k_cache, v_cache, k_scale | None, v_scale | None, slots [T] int64, k [T, Hk, D], v,
             kv_dtype: KVDtype) -> None                                 (decode: quantize per token per KV head)
    quantize_kv(x [T, Hk, D], kv_dtype) -> (q [T, Hk, D], scale [T, Hk] float32 | None)
        (prefill: the colocated cache write and the KV export both use it, so they store identical bytes)
    rope_kv_write(qkv [T, (H + 2Hk)·D], positions [T] int64, inv_freq [D/2] float32, num_heads, slots [T] int64,
                  k_cache, v_cache, k_scale | None, v_scale | None, kv_dtype) -> q [T, H, D]
        (decode: RoPE on q and k of the fused QKV output, then k/v written as kv_write does; one launch in
        a kernel backend. Slot -1 = skip the token: backends must honour it, the reference needs slots >= 0)
    prefill_rope_kv(qkv [T, (H + 2Hk)·D], positions [T], inv_freq [D/2] float32, num_heads,
                    caches (k_cache, v_cache, k_scale | None, v_scale | None) | None, slots [T] int64 | None,
                    kv_dtype) -> (q [T, H, D], k [T, Hk, D], v [T, Hk, D])
        (prefill: RoPE on q and k, returned in qkv's dtype with v (contiguous); with `caches`, k/v are also
        written at `slots` (>= 0) exactly as `quantize_kv(k)`, `quantize_kv(v)` of the returned k, v would
        store them, so a colocated prefill and a KV export of the same prompt hold identical bytes; one launch
        in a kernel backend)

A backend registered with `graph_safe=True` promises that its decode ops (all of the above that decode
uses) make no host synchronisation, honour slot -1 and accept int32 index tensors (token ids, positions,
slots, block tables, context lengths: the engine's CUDA graphs feed int32), so the engine may capture
decode steps in CUDA graphs with padded batches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from orchestrator.core.types import KVDtype
from workers.engine import fp8 as fp8q

REFERENCE = "reference"
AUTOLOAD_MODULES = {"cuda": "workers.kernels.engine_backend"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + x
    return rms_norm(h, weight, eps), h


def add_rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = residual + x
    q, s = fp8q.quantize_per_row(rms_norm(h, weight, eps), fp8_dtype)
    return q, s, h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on q [T, H, D] and k [T, Hk, D]; angles in float32, cos/sin rounded to q's dtype."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.unsqueeze(0)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype).unsqueeze(1), emb.sin().to(q.dtype).unsqueeze(1)  # [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_kv_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    kv_dtype: KVDtype,
) -> torch.Tensor:
    """RoPE on the q and k parts of a fused QKV output, k/v into the cache at `slots`; returns rotated q."""
    hk, d = k_cache.shape[2], k_cache.shape[3]
    nq, nk = num_heads * d, hk * d
    q = qkv[:, :nq].reshape(-1, num_heads, d)
    k = qkv[:, nq : nq + nk].reshape(-1, hk, d)
    v = qkv[:, nq + nk :].reshape(-1, hk, d)
    q, k = apply_rope(q, k, positions, inv_freq)
    kv_write(k_cache, v_cache, k_scale, v_scale, slots, k, v.contiguous(), kv_dtype)
    return q


def prefill_rope_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
    slots: torch.Tensor | None,
    kv_dtype: KVDtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill RoPE (+ the K/V cache write when `caches` is given); see the module docstring."""
    d = inv_freq.shape[0] * 2
    hk = (qkv.shape[1] // d - num_heads) // 2
    nq, nk = num_heads * d, hk * d
    q = qkv[:, :nq].reshape(-1, num_heads, d)
    k = qkv[:, nq : nq + nk].reshape(-1, hk, d)
    v = qkv[:, nq + nk :].reshape(-1, hk, d).contiguous()
    q, k = apply_rope(q, k, positions, inv_freq)
    if caches is not None:
        assert slots is not None, "a prefill cache write needs slots"
        kq, ks = fp8q.quantize_kv(k, kv_dtype)
        vq, vs = fp8q.quantize_kv(v, kv_dtype)
        write_kv_raw(*caches, slots, kq, vq, ks, vs)
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8q.quantize_per_row(x, fp8_dtype)


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8q.quantize_per_row(rms_norm(x, weight, eps), fp8_dtype)


def silu_mul_quant(gate_up: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8q.quantize_per_row(silu_mul(gate_up), fp8_dtype)


def fp8_linear(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    w_q_compute: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Exact emulation: unscaled FP8 values are exact in bf16/float32; multiply, then apply both scales."""
    if q.is_cuda and out_dtype == torch.bfloat16:
        y = _scaled_mm_cuda(q, x_scale, w_q, w_scale, out_dtype)
        if y is not None:
            return y if bias is None else y + bias
    wc = w_q_compute if w_q_compute is not None else w_q.to(out_dtype)
    acc = (q.to(wc.dtype) @ wc.t()).float()
    y = (acc * x_scale.reshape(-1, 1) * w_scale.reshape(1, -1)).to(out_dtype)
    return y if bias is None else y + bias


def prepare_fp8_weight(w_q: torch.Tensor) -> torch.Tensor:
    """Reference: the row-major weight as it is."""
    return w_q


def _scaled_mm_cuda(
    q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """torch._scaled_mm: B must be column-major (w_q [N, K] row-major, transposed view) and dims % 16 == 0."""
    m, k = q.shape
    n = w_q.shape[0]
    if k % 16 or n % 16:
        return None
    pad = (-m) % 16
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
    rowwise = x_scale.numel() > 1 or w_scale.numel() > 1
    if rowwise:
        sa = x_scale.reshape(-1, 1).float().expand(m, 1)
        if pad:
            sa = torch.cat([sa, sa.new_ones(pad, 1)])
        sb = w_scale.reshape(1, -1).float().expand(1, n).contiguous()
        sa = sa.contiguous()
    else:
        sa = x_scale.reshape(()).float()
        sb = w_scale.reshape(()).float()
    try:
        y = torch._scaled_mm(q, w_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    except RuntimeError:
        return None
    return y[:m]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    if q.is_cuda:  # the flash kernel reads the shared K/V heads itself (no repeat_interleave copy)
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm_scale, enable_gqa=group > 1)
        return out.squeeze(0).transpose(0, 1)
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm_scale)
    return out.squeeze(0).transpose(0, 1)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(num_seqs):
        n = int(context_lens[i])
        blocks = block_tables[i, : (n + block_size - 1) // block_size]
        k = _gather(k_cache, k_scale, blocks, n)  # [n, Hk, D] float32
        v = _gather(v_cache, v_scale, blocks, n)
        qi = q[i].float().reshape(num_kv_heads, group, head_dim)
        scores = torch.einsum("kgd,tkd->kgt", qi, k) * sm_scale
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("kgt,tkd->kgd", probs, v).reshape(num_heads, head_dim).to(q.dtype)
    return out


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor, n: int) -> torch.Tensor:
    data = cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:n]
    s = None if scale is None else scale[blocks].reshape(-1, scale.shape[2])[:n]
    return fp8q.dequantize_kv(data, s, torch.float32)


def kv_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_dtype: KVDtype,
) -> None:
    kq, ks = fp8q.quantize_kv(k, kv_dtype)
    vq, vs = fp8q.quantize_kv(v, kv_dtype)
    write_kv_raw(k_cache, v_cache, k_scale, v_scale, slots, kq, vq, ks, vs)


def write_kv_raw(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    slots: torch.Tensor,
    kq: torch.Tensor,
    vq: torch.Tensor,
    ks: torch.Tensor | None,
    vs: torch.Tensor | None,
) -> None:
    """Store already-quantized KV (and scales) at flat slots (block * block_size + offset)."""
    hk, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, hk, d)[slots] = kq
    v_cache.view(-1, hk, d)[slots] = vq
    if k_scale is not None and v_scale is not None:
        assert ks is not None and vs is not None, "fp8 KV needs scales"
        k_scale.view(-1, hk)[slots] = ks
        v_scale.view(-1, hk)[slots] = vs


@dataclass(frozen=True)
class Ops:
    """The op table one engine uses; `backend` names where the non-reference entries came from."""

    backend: str
    rms_norm: Callable[..., torch.Tensor]
    silu_mul: Callable[..., torch.Tensor]
    quantize_rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rms_norm_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fp8_linear: Callable[..., torch.Tensor]
    prefill_attention: Callable[..., torch.Tensor]
    paged_attention_decode: Callable[..., torch.Tensor]
    kv_write: Callable[..., None]
    quantize_kv: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    add_rms_norm_quant: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rope_kv_write: Callable[..., torch.Tensor]
    prefill_rope_kv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    prefill_attention_fp8: Callable[..., torch.Tensor] | None = None  # see the module docstring
    prepare_fp8_weight: Callable[[torch.Tensor], Any] = prepare_fp8_weight
    graph_safe: bool = False  # decode may be captured in CUDA graphs (see the module docstring)


REFERENCE_OPS = Ops(
    backend=REFERENCE,
    rms_norm=rms_norm,
    silu_mul=silu_mul,
    quantize_rows=quantize_rows,
    rms_norm_quant=rms_norm_quant,
    silu_mul_quant=silu_mul_quant,
    fp8_linear=fp8_linear,
    prefill_attention=prefill_attention,
    paged_attention_decode=paged_attention_decode,
    kv_write=kv_write,
    quantize_kv=fp8q.quantize_kv,
    add_rms_norm=add_rms_norm,
    add_rms_norm_quant=add_rms_norm_quant,
    rope_kv_write=rope_kv_write,
    prefill_rope_kv=prefill_rope_kv,
)
OP_NAMES = tuple(f.name for f in fields(Ops) if f.name not in ("backend", "graph_safe"))


@dataclass(frozen=True)
class _Registered:
    device_type: str
    priority: int
    impls: Mapping[str, Callable[..., object]]
    graph_safe: bool = False


_REGISTRY: dict[str, _Registered] = {}


class UnknownOpsBackend(ValueError):
    pass


def register_backend(
    name: str,
    impls: Mapping[str, Callable[..., object]],
    device_type: str = "cuda",
    priority: int = 10,
    graph_safe: bool = False,
) -> None:
    """Register (or replace) a backend: a mapping from op names (`OP_NAMES`) to callables.

    graph_safe: the backend's decode ops are CUDA-graph capturable and skip slot -1 (module docstring)."""
    unknown = sorted(set(impls) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op name(s) {unknown}; known: {', '.join(OP_NAMES)}")
    if name == REFERENCE:
        raise ValueError(f"{REFERENCE!r} is the built-in torch backend and cannot be replaced")
    _REGISTRY[name] = _Registered(device_type, priority, dict(impls), graph_safe)


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_backends() -> dict[str, str]:
    """Backend name -> device type."""
    return {name: r.device_type for name, r in _REGISTRY.items()}


def get_ops(device: torch.device | str, backend: str | None = None) -> Ops:
    """The op table for `device`: a named backend, or the best registered one, else the reference."""
    device_type = torch.device(device).type
    if backend == REFERENCE:
        return REFERENCE_OPS
    if backend is None and device_type in AUTOLOAD_MODULES:
        try:
            importlib.import_module(AUTOLOAD_MODULES[device_type])
        except ModuleNotFoundError as exc:
            if exc.name is None or not AUTOLOAD_MODULES[device_type].startswith(exc.name):
                raise
    if backend is not None:
        if backend not in _REGISTRY:
            known = ", ".join([REFERENCE, *sorted(_REGISTRY)])
            raise UnknownOpsBackend(f"unknown ops backend {backend!r}; registered: {known}")
        chosen = _REGISTRY[backend]
        name = backend
    else:
        candidates = [(r.priority, n) for n, r in _REGISTRY.items() if r.device_type == device_type]
        if not candidates:
            return REFERENCE_OPS
        _, name = max(candidates)
        chosen = _REGISTRY[name]
    return replace(REFERENCE_OPS, backend=name, graph_safe=chosen.graph_safe, **chosen.impls)  # type: ignore[arg-type]

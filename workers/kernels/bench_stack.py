"""A Llama-3.1-8B-shaped decoder stack built from this package's kernels, for scripts/bench_engine.py.

Random weights, one GPU, bf16 or FP8 linear layers (+ bf16 or FP8 paged KV). It is NOT the engine
(workers/engine): it is the engine's hot path written out with the same ops, so that prefill time and decode
tokens/s can be measured at the 8B shape with CUDA graphs for decode steps. What each step runs, per layer:

    rms_norm(+residual)[+quant] → QKV linear → rope_kv_write (RoPE on q, k + K/V quantize-and-write, one
    launch) → attention → [quant] → O linear
    → rms_norm(+residual)[+quant] → gate_up linear → silu_mul[+quant] → down linear
then the final norm, the bf16 LM head on the last position and an argmax. Prefill attention is torch SDPA
(bf16) in bf16 mode and `prefill_attention_fp8` (FP8 Q/K/V/P) in FP8 mode for prompts of at least
`prefill_attention.MIN_TOKENS` tokens unless `fp8_attn` is False;
decode attention is paged_decode_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kernels.attention import paged_decode_attention
from workers.kernels.gemm import fp8_linear
from workers.kernels.kv_cache import kv_write, rope_kv_write
from workers.kernels.prefill_attention import MIN_TOKENS as PA_MIN_TOKENS
from workers.kernels.prefill_attention import prefill_attention_fp8
from workers.kernels.quant import quantize_per_token, rms_norm_quant, silu_mul_quant

F8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    inter: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    eps: float = 1e-5
    rope_theta: float = 500000.0


class Linear:
    """y = x Wᵀ in bf16, or FP8 row-wise (x quantized per token by its producer, W per output channel)."""

    def __init__(self, n: int, k: int, fp8: bool, dev: str):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        self.fp8 = fp8
        if fp8:
            self.w_q, self.w_s = quantize_per_token(w, F8)
            del w
        else:
            self.w = w

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp8:
            return fp8_linear(x, x_scale, self.w_q, self.w_s)
        return x @ self.w.t()


class Stack:
    """The decoder stack plus its paged KV cache (block size 16; caches may be shared by several layers)."""

    def __init__(self, shape: Shape, fp8: bool, kv_fp8: bool, max_tokens: int, distinct_kv_layers: int,
                 dev: str = "cuda", block_size: int = 16, fused_rope: bool = True):
        s = self.s = shape
        self.fused_rope = fused_rope
        self.fp8_attn = fp8  # FP8 prefill attention in FP8 mode (toggle to compare with bf16 SDPA)
        self.fp8, self.kv_fp8, self.dev, self.bs = fp8, kv_fp8, dev, block_size
        qkv_n = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.layers = []
        for _ in range(s.layers):
            self.layers.append(dict(
                in_norm=torch.ones(s.hidden, device=dev, dtype=torch.bfloat16),
                post_norm=torch.ones(s.hidden, device=dev, dtype=torch.bfloat16),
                qkv=Linear(qkv_n, s.hidden, fp8, dev), o=Linear(s.hidden, s.heads * s.head_dim, fp8, dev),
                gate_up=Linear(2 * s.inter, s.hidden, fp8, dev), down=Linear(s.hidden, s.inter, fp8, dev),
            ))
        self.final_norm = torch.ones(s.hidden, device=dev, dtype=torch.bfloat16)
        self.lm_head = torch.randn(s.vocab, s.hidden, device=dev, dtype=torch.bfloat16) * 0.02
        self.embed = torch.randn(s.vocab, s.hidden, device=dev, dtype=torch.bfloat16)
        num_blocks = -(-max_tokens // block_size)
        kv_dtype = F8 if kv_fp8 else torch.bfloat16
        self.distinct_kv_layers = distinct_kv_layers
        self.caches = []
        for _ in range(distinct_kv_layers):
            kc = torch.randn(num_blocks, block_size, s.kv_heads, s.head_dim, device=dev, dtype=torch.bfloat16).to(kv_dtype)
            vc = torch.randn_like(kc, dtype=torch.bfloat16).to(kv_dtype)
            ks = torch.rand(num_blocks, block_size, s.kv_heads, device=dev) * 0.01 if kv_fp8 else None
            vs = torch.rand(num_blocks, block_size, s.kv_heads, device=dev) * 0.01 if kv_fp8 else None
            self.caches.append((kc, vc, ks, vs))
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=dev).float() / s.head_dim))
        self.inv_freq = inv

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D]; rotate-half RoPE in float32
        ang = pos.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def _prefill_kv(self, qkv, pos, T):
        """Prefill attention reads K/V from the projection (bf16, rotated), not from the cache."""
        s = self.s
        _, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        return self._rope(k.reshape(T, s.kv_heads, s.head_dim), pos), v.reshape(T, s.kv_heads, s.head_dim)

    def _norm(self, x, w, res):
        y, sc, new_res = rms_norm_quant(x, w, self.s.eps, F8 if self.fp8 else None, residual=res)
        return y, sc, (new_res if res is not None else x)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, decode: dict | None):
        """tokens, pos, slots: [T]. decode=None: one prompt (prefill, causal SDPA); else a dict with
        block_table [B, nb], seq_lens [B], max_seq_len (one new token per sequence). Returns next ids [.]."""
        s = self.s
        x = self.embed[tokens]
        res = None
        T = x.shape[0]
        for i, L in enumerate(self.layers):
            h, sc, res = self._norm(x, L["in_norm"], res)
            qkv = L["qkv"](h, sc)
            kc, vc, ks, vs = self.caches[i % self.distinct_kv_layers]
            k_pre = torch.empty(T, s.kv_heads, s.head_dim, device=x.device, dtype=x.dtype) if decode is None else None
            if self.fused_rope:
                q = rope_kv_write(qkv, pos, self.inv_freq, s.heads, slots, kc, vc, ks, vs, k_out=k_pre)
            else:
                q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
                q = self._rope(q.view(T, s.heads, s.head_dim), pos)
                k = self._rope(k.view(T, s.kv_heads, s.head_dim), pos)
                kv_write(k, v.reshape(T, s.kv_heads, s.head_dim), slots, kc, vc, ks, vs)
            if decode is None:
                k, v = self._prefill_kv(qkv, pos, T) if not self.fused_rope else (
                    k_pre, qkv[:, (s.heads + s.kv_heads) * s.head_dim:].reshape(T, s.kv_heads, s.head_dim))
                if self.fp8_attn and T >= PA_MIN_TOKENS:
                    a = prefill_attention_fp8(q, k, v, s.head_dim**-0.5)
                else:
                    a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                       v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
                    a = a[0].transpose(0, 1)
            else:
                a = paged_decode_attention(q, kc, vc, decode["block_table"], decode["seq_lens"], s.head_dim**-0.5,
                                           ks, vs, max_seq_len=decode["max_seq_len"])
            a = a.reshape(T, s.heads * s.head_dim)
            if self.fp8:
                aq, asc = quantize_per_token(a, F8)
                x = L["o"](aq, asc)
            else:
                x = L["o"](a)
            h, sc, res = self._norm(x, L["post_norm"], res)
            gu = L["gate_up"](h, sc)
            act, asc = silu_mul_quant(gu, F8 if self.fp8 else None)
            x = L["down"](act, asc)
        last = x[-1:] if decode is None else x
        last_res = res[-1:] if decode is None else res
        y, _, _ = rms_norm_quant(last, self.final_norm, s.eps, None, residual=last_res)
        return (y @ self.lm_head.t()).argmax(dim=-1)


def time_prefill_ms(stack: Stack, prompt_len: int, reps: int = 3) -> float:
    dev = stack.dev
    tokens = torch.randint(0, stack.s.vocab, (prompt_len,), device=dev)
    pos = torch.arange(prompt_len, device=dev)
    slots = torch.arange(prompt_len, device=dev)
    stack.forward(tokens, pos, slots, None)  # warm-up (compiles)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        stack.forward(tokens, pos, slots, None)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_decode_step_ms(stack: Stack, batch: int, ctx: int, reps: int = 20) -> float:
    """One decode step for `batch` sequences that each hold ctx-1 cached tokens, captured as a CUDA graph."""
    dev, bs = stack.dev, stack.bs
    nb = -(-ctx // bs)
    table = torch.arange(batch * nb, device=dev, dtype=torch.int32).reshape(batch, nb)
    seq_lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    tokens = torch.randint(0, stack.s.vocab, (batch,), device=dev)
    pos = torch.full((batch,), ctx - 1, device=dev)
    slots = (table[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs)
    meta = dict(block_table=table, seq_lens=seq_lens, max_seq_len=ctx)
    stack.forward(tokens, pos, slots, meta)  # compile
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stack.forward(tokens, pos, slots, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stack.forward(tokens, pos, slots, meta)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return sorted(times)[len(times) // 2]


# Kernel-name fragments → the part of a prefill they belong to (for profile_prefill_ms).
PARTS = (("attention", ("_attn_fwd_kernel", "flash", "fmha", "cudnn", "attention", "sdpa")),
         ("attention fp8 quantize", ("_quant_kv_kernel",)),
         ("linear GEMMs", ("gemm", "_scaled_mm", "xmma", "cutlass", "nvjet", "sm90", "cublas", "matmul")),
         ("norm/quant/silu", ("_rms_norm", "_silu_mul", "_quant_kernel")),
         ("rope + KV write", ("_rope_kv_write", "_kv_write")))


def profile_prefill_ms(stack: Stack, prompt_len: int) -> dict[str, float]:
    """GPU kernel time of one prefill, summed by part (torch.profiler; kernels only, no launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    dev = stack.dev
    tokens = torch.randint(0, stack.s.vocab, (prompt_len,), device=dev)
    pos = torch.arange(prompt_len, device=dev)
    stack.forward(tokens, pos, pos, None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stack.forward(tokens, pos, pos, None)
        torch.cuda.synchronize()
    parts: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if not us or ev.key.startswith("ProfilerStep"):
            continue
        name = ev.key.lower()
        part = next((p for p, keys in PARTS if any(k.lower() in name for k in keys)), "other")
        parts[part] = parts.get(part, 0.0) + us / 1e3
    parts["total kernels"] = sum(parts.values())
    return parts

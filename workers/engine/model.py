"""The Llama-family decoder (Llama 3.x, Qwen2, Mistral-compatible): weights, linear modes, forward passes.

Two forward passes share every layer:
- `prefill(token_ids)`: one sequence from position 0; each layer's K/V [T, Hk, D] is written into the
  paged cache by the RoPE op itself when a cache is given (colocated) and/or goes to a callback the moment
  it exists (streamed out for disaggregation); attention reads the exact K/V of the chunk.
- `decode(...)`: one token per sequence for a batch; K/V is written into the paged cache first and
  attention reads the whole context back from the cache (dequantized when FP8).
Logits come out in float32; the LM head runs in the compute dtype (never FP8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.core.types import FP8Format, KVDtype, LinearMode, Rounding
from workers.engine import fp8 as fp8q
from workers.engine.ops import Ops


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a loaded model (from a preset or a checkpoint's config.json)."""

    name: str
    architecture: str  # "llama", "qwen2" or "mistral"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; () = none
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with Llama-3 (or linear) frequency scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        # long wavelengths (low frequencies) are slowed by `factor`; short ones kept; a smooth blend between
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(is_mid, blended, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class Linear:
    """One linear layer in a `LinearMode`. FP8 weights are quantized once at build time.

    bf16: y = x W^T (+ b) in the compute dtype.
    fp8-dynamic: per-token activation scales, per-output-channel weight scales.
    fp8-static: one activation scale per tensor from `calibrate`, one weight scale per tensor.
    Stochastic rounding (activations and weights) draws from a hash of (token position, column, salt).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mode: LinearMode,
        fmt: FP8Format,
        rounding: Rounding,
        compute_dtype: torch.dtype,
        salt: int,
        ops: Ops,
    ) -> None:
        self.mode = LinearMode(mode)
        self.rounding = Rounding(rounding)
        self.compute_dtype = compute_dtype
        self.salt = salt
        self.ops = ops
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.out_features = int(weight.shape[0])
        self.act_scale: torch.Tensor | None = None
        self.calib_amax: float | None = None  # set to 0.0 to record activation amax (calibration)
        if not self.mode.is_fp8:
            self.weight: torch.Tensor | None = weight.to(compute_dtype)
            return
        self.weight = None
        self.fp8_dtype = fp8q.fp8_dtype(fmt)
        per_channel = self.mode is LinearMode.FP8_DYNAMIC
        self.w_q, self.w_scale = fp8q.quantize_weight(weight, self.fp8_dtype, per_channel, self.rounding, salt)
        self.w_q_compute = None if weight.is_cuda else self.w_q.to(compute_dtype)
        if per_channel:  # the backend may re-lay the weight out for its GEMMs (ops.prepare_fp8_weight); static
            self.w_q = ops.prepare_fp8_weight(self.w_q)  # linears keep row-major weights for their calibration

    @property
    def fused_dynamic(self) -> bool:
        """True when the producer may hand over (q, scale) itself (fused RMSNorm/SiLU-mul + quant)."""
        return self.mode is LinearMode.FP8_DYNAMIC and self.rounding is Rounding.NEAREST and self.calib_amax is None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.calib_amax is not None:
            self.calib_amax = max(self.calib_amax, float(x.float().abs().max()))
            w = (self.w_q.float() * self.w_scale.reshape(-1, 1)).to(self.compute_dtype)
            return torch.nn.functional.linear(x, w, self.bias)
        if self.mode is LinearMode.FP8_STATIC:
            if self.act_scale is None:
                raise RuntimeError("fp8-static linear used before calibration")
            q = fp8q.quantize_with_scale(x, self.act_scale, self.fp8_dtype, self.rounding, positions, self.salt)
            return self.from_quantized(q, self.act_scale)
        if self.rounding is Rounding.NEAREST:
            q, s = self.ops.quantize_rows(x, self.fp8_dtype)
        else:
            q, s = fp8q.quantize_per_row(x, self.fp8_dtype, self.rounding, positions, self.salt)
        return self.from_quantized(q, s)

    def from_quantized(self, q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return self.ops.fp8_linear(q, x_scale, self.w_q, self.w_scale, self.w_q_compute, self.bias, self.compute_dtype)

    def finish_calibration(self) -> None:
        amax = self.calib_amax or 0.0
        self.act_scale = torch.tensor([max(amax, 1e-6) / fp8q.fp8_max(self.fp8_dtype)], device=self.w_q.device)
        self.calib_amax = None


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


KVCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class LlamaModel:
    """Forward passes over weights named as in Hugging Face checkpoints (`model.layers.{i}.…`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        compute_dtype: torch.dtype,
        linear_mode: LinearMode,
        fp8_format: FP8Format,
        rounding: Rounding,
        ops: Ops,
    ) -> None:
        self.cfg = cfg
        self.dtype = compute_dtype
        self.ops = ops
        self.embed = weights["model.embed_tokens.weight"].to(compute_dtype)
        head = weights.get("lm_head.weight")
        self.lm_head = self.embed if head is None else head.to(compute_dtype)
        self.final_norm = weights["model.norm.weight"].to(compute_dtype)
        self.inv_freq = rope_inv_freq(cfg).to(self.embed.device)
        self.sm_scale = cfg.head_dim**-0.5
        self.layers: list[_Layer] = []

        def lin(w_names: list[str], salt: int) -> Linear:
            w = torch.cat([weights[n + ".weight"] for n in w_names])
            biases = [weights.get(n + ".bias") for n in w_names]
            bias = None
            if any(b is not None for b in biases):
                parts = [b if b is not None else weights[n + ".weight"].new_zeros(weights[n + ".weight"].shape[0])
                         for b, n in zip(biases, w_names, strict=True)]
                bias = torch.cat(parts)
            return Linear(w, bias, linear_mode, fp8_format, rounding, compute_dtype, salt, ops)

        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            att, mlp = p + "self_attn.", p + "mlp."
            self.layers.append(
                _Layer(
                    input_norm=weights[p + "input_layernorm.weight"].to(compute_dtype),
                    post_norm=weights[p + "post_attention_layernorm.weight"].to(compute_dtype),
                    qkv=lin([att + "q_proj", att + "k_proj", att + "v_proj"], 4 * i),
                    o=lin([att + "o_proj"], 4 * i + 1),
                    gate_up=lin([mlp + "gate_proj", mlp + "up_proj"], 4 * i + 2),
                    down=lin([mlp + "down_proj"], 4 * i + 3),
                )
            )

    def linears(self) -> list[Linear]:
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    # ---- shared pieces -------------------------------------------------------------------------
    # The residual stream is carried as (x, pending): the next norm adds `pending` (a layer's output)
    # into x itself (`add_rms_norm*`), so the residual add fuses into the norm on kernel backends.
    def _norm_in(
        self, x: torch.Tensor, pending: torch.Tensor | None, weight: torch.Tensor, lin: Linear
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(normed input or its FP8 (q, scale) for `lin`, the updated residual x)."""
        eps = self.cfg.rms_norm_eps
        if lin.fused_dynamic:
            if pending is None:
                q, s = self.ops.rms_norm_quant(x, weight, eps, lin.fp8_dtype)
                return q, s, x
            return self.ops.add_rms_norm_quant(pending, x, weight, eps, lin.fp8_dtype)
        if pending is None:
            return self.ops.rms_norm(x, weight, eps), None, x
        y, x = self.ops.add_rms_norm(pending, x, weight, eps)
        return y, None, x

    @staticmethod
    def _apply(lin: Linear, y: torch.Tensor, scale: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        return lin(y, positions) if scale is None else lin.from_quantized(y, scale)

    def _qkv_out(
        self, layer: _Layer, x: torch.Tensor, pending: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, s, x = self._norm_in(x, pending, layer.input_norm, layer.qkv)
        return self._apply(layer.qkv, y, s, positions), x

    def _mlp(
        self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o-projection and MLP; returns (the residual x with the attention output added, the MLP output)."""
        o_out = layer.o(attn.reshape(attn.shape[0], -1), positions)
        if layer.gate_up.fused_dynamic and layer.down.fused_dynamic:
            qx, sx, x = self.ops.add_rms_norm_quant(o_out, x, layer.post_norm, self.cfg.rms_norm_eps,
                                                    layer.gate_up.fp8_dtype)
            gu = layer.gate_up.from_quantized(qx, sx)
            qa, sa = self.ops.silu_mul_quant(gu, layer.down.fp8_dtype)
            return x, layer.down.from_quantized(qa, sa)
        h, x = self.ops.add_rms_norm(o_out, x, layer.post_norm, self.cfg.rms_norm_eps)
        act = self.ops.silu_mul(layer.gate_up(h, positions))
        return x, layer.down(act, positions)

    def _logits(self, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if pending is None:
            y = self.ops.rms_norm(x, self.final_norm, eps)
        else:
            y, _ = self.ops.add_rms_norm(pending, x, self.final_norm, eps)
        return torch.nn.functional.linear(y, self.lm_head).float()

    # ---- forward passes ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        token_ids: torch.Tensor,
        on_kv: KVCallback | None,
        all_logits: bool = False,
        cache: Any = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids [T] from position 0 → logits [V] of the last token (or [T, V] with all_logits).

        cache/slots (optional, together): each layer's K/V is written into the paged cache at `slots` [T] by
        the RoPE op itself (`ops.prefill_rope_kv`: one launch on a kernel backend), stored exactly as
        `ops.quantize_kv` of the K/V handed to `on_kv` would be, so colocated and exported KV are identical."""
        if (cache is None) != (slots is None):
            raise ValueError("prefill: give both cache and slots, or neither")
        positions = torch.arange(token_ids.shape[0], device=token_ids.device)
        x = self.embed[token_ids]
        pending: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            out, x = self._qkv_out(layer, x, pending, positions)
            caches = None if cache is None else cache.layer(i)
            kv_dtype = None if cache is None else cache.kv_dtype
            q, k, v = self.ops.prefill_rope_kv(out, positions, self.inv_freq, self.cfg.num_heads, caches, slots,
                                               kv_dtype)
            if on_kv is not None:
                on_kv(i, k, v)
            # FP8 linear modes take the backend's FP8 prefill attention when it has one (workers/kernels)
            fp8_attn = self.ops.prefill_attention_fp8 if layer.qkv.mode.is_fp8 else None
            attn = (fp8_attn or self.ops.prefill_attention)(q, k, v, self.sm_scale)
            x, pending = self._mlp(layer, x, attn, positions)
        if all_logits:
            return self._logits(x, pending)
        return self._logits(x[-1:], None if pending is None else pending[-1:])[0]

    @torch.inference_mode()
    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """One token per sequence: token_ids/positions/slots [B] → logits [B, V]; writes KV at `slots`.

        No host synchronisation on the way (CUDA-graph capturable when the ops backend is graph-safe)."""
        x = self.embed[token_ids]
        kv_dtype: KVDtype = cache.kv_dtype
        pending: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            out, x = self._qkv_out(layer, x, pending, positions)
            kc, vc, ks, vs = cache.layer(i)
            q = self.ops.rope_kv_write(out, positions, self.inv_freq, self.cfg.num_heads, slots, kc, vc, ks, vs,
                                       kv_dtype)
            attn = self.ops.paged_attention_decode(q, kc, vc, ks, vs, block_tables, context_lens, self.sm_scale)
            x, pending = self._mlp(layer, x, attn, positions)
        return self._logits(x, pending)

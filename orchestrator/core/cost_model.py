"""The cost model: the single source of time and energy estimates (docs/cost-model.md).

The router decides with it and the simulator advances time with it, so both agree by construction.

Time of one forward step on one accelerator (seed paper eqs. 2-5 for the FLOPs, a measured-efficiency
roofline per GEMM for the time):

    step = overhead + layers · Σ_gemm t_gemm(M, K, N; fp8 or bf16 by linear mode)   # QKV, O, gate|up, down
         + t_gemm(rows_with_logits, h, vocab; bf16)                                   # LM head, always bf16
         + Σ_seq max(attn FLOPs / (peak_bf16 · attention_efficiency), KV bytes / measured_mem_bw)
         + elementwise bytes / measured_mem_bw                                        # norms, RoPE, SiLU·mul

where M is the number of tokens the step computes (prefill: the prompt tokens of the batch; decode:
the batch size) and t_gemm is `HardwareSpec.gemm_time_s` (a `GemmCurve` fitted to measurements).
A `CalibrationProfile` replaces catalog figures (curves, bandwidth, power, overheads) where present.

Energy is power × time; power is linear in utilization between idle and the phase's full-load power.
Pure Python; `hw` arguments take a catalog key or a HardwareSpec, `link` a link key or a LinkSpec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.core.hardware import GemmKind, HardwareCatalog, HardwareSpec, LinkSpec, Phase
from orchestrator.core.model_shape import ModelShape
from orchestrator.core.types import KVDtype, LinearMode, TandemError, mypyc_attr

if TYPE_CHECKING:
    from orchestrator.core.calibration import CalibrationProfile

__all__ = ["CostModel", "InvalidCostQuery", "Phase"]

FP8_SCALE_BYTES = 4  # one float32 scale per token per KV head (workers/kv_payload.py)
# Activation traffic of the non-GEMM ops per token per layer, in elements: RMSNorm ×2 (read+write h
# each), two residual adds (3h each), RoPE on q and k, SiLU·mul (read 2·ai, write ai). An estimate;
# fused kernels move less.
_ELEMENTWISE_H, _ELEMENTWISE_AI = 12, 3
_ACT_BYTES = 2  # bf16 activations
_CACHE_MAX = 1 << 20  # entries of a memo table before it is cleared


@mypyc_attr(native_class=False)
class InvalidCostQuery(TandemError, ValueError):
    """A cost query with impossible arguments (negative tokens, utilization outside [0, 1], ...)."""


class CostModel:
    """Time, bytes, power and energy of serving `model` on the accelerators of `catalog`."""

    def __init__(
        self, model: ModelShape, catalog: HardwareCatalog, profile: CalibrationProfile | None = None
    ) -> None:
        self.model = model
        self.profile = profile
        self.catalog = profile.apply(catalog) if profile is not None else catalog
        self._linear_cache: dict[tuple[str, int, LinearMode], float] = {}
        self._gemm_cache: dict[tuple[str, int, int, int, GemmKind], float] = {}
        self._gemm_args: dict[tuple[str, GemmKind], tuple[Any, float, int]] = {}  # (curve, peak TFLOP/s, bytes)
        self._prefill1: dict[tuple[str, int, int, LinearMode, KVDtype], float] = {}  # one-sequence prefills
        self._decode_fixed: dict[tuple[str, int, LinearMode], tuple[float, float, float, float]] = {}
        self._accepted: dict[int, tuple[HardwareSpec, HardwareSpec]] = {}
        self._exposed_cache: dict[tuple[str, int, KVDtype, str, LinearMode], float] = {}
        m = model
        self._layer_gemms: tuple[tuple[int, int], ...] = (  # (K, N) of each linear GEMM of one layer
            (m.hidden_size, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim),  # fused QKV
            (m.num_heads * m.head_dim, m.hidden_size),  # O
            (m.hidden_size, 2 * m.intermediate_size),  # fused gate|up
            (m.intermediate_size, m.hidden_size),  # down
        )
        self._kv_bytes_per_token = {dt: self._kv_bytes_one_token(dt) for dt in KVDtype}
        self._attn_flops_per_ctx = 4.0 * m.num_layers * m.num_heads * m.head_dim

    # ---------------------------------------------------------------- lookups
    def spec(self, hw: str | HardwareSpec) -> HardwareSpec:
        """The (profile-calibrated) catalog entry of `hw`. A HardwareSpec passed in must equal this model's
        entry of its key (e.g. one from another load of the same catalog); a different one is refused."""
        if isinstance(hw, HardwareSpec):
            ours = self._accepted.get(id(hw))
            if ours is not None and ours[0] is hw:
                return ours[1]
            mine = self.catalog[hw.key]
            if mine is not hw and mine != hw:
                # a spec that differs from this model's (calibrated) catalog entry would poison the caches
                raise InvalidCostQuery(
                    f"HardwareSpec {hw.key!r} differs from this cost model's catalog entry; pass the key "
                    "(or cost.spec(key)), or build the CostModel from the catalog that spec came from"
                )
            self._accepted[id(hw)] = (hw, mine)
            return mine
        return self.catalog[hw]

    def link(self, link: str | LinkSpec | None) -> LinkSpec:
        if link is None:
            return self.catalog.default_link
        return link if isinstance(link, LinkSpec) else self.catalog.link(link)

    def is_fp8_fallback(self, hw: str | HardwareSpec, linear_mode: LinearMode) -> bool:
        """True when `linear_mode` asks for FP8 but `hw` has none: it is then costed at bf16."""
        return self.spec(hw).fp8_fallback(linear_mode)

    # ---------------------------------------------------------------- pieces
    def gemm_time_s(self, hw: str | HardwareSpec, m: int, k: int, n: int, kind: GemmKind) -> float:
        """One GEMM (M×K)·(K×N) of `kind` on `hw`, from its calibrated curve."""
        return self._gemm(self.spec(hw), m, k, n, kind)

    def _gemm(self, spec: HardwareSpec, m: int, k: int, n: int, kind: GemmKind) -> float:
        """`spec.gemm_time_s(m, k, n, kind)` (spec: this model's entry), memoised per shape; on a miss
        the curve, peak and operand size of (device, kind) come from a memo too — what
        `HardwareSpec.gemm_time_s` looks up each call (`tests/unit/cost` checks they agree)."""
        key = (spec.key, m, k, n, kind)
        t = self._gemm_cache.get(key)
        if t is None:
            if len(self._gemm_cache) > _CACHE_MAX:
                self._gemm_cache.clear()
            args = self._gemm_args.get((spec.key, kind))
            if args is None:
                eff = kind if spec.has_fp8 else GemmKind.BF16  # HardwareSpec.gemm_time_s's fallback
                args = self._gemm_args[(spec.key, kind)] = (spec.curve(eff), spec.peak_tflops(eff), eff.operand_bytes)
            t = args[0].time_s(m, k, n, args[1], args[2])
            self._gemm_cache[key] = t
        return t

    def linear_time_s(self, hw: str | HardwareSpec, num_rows: int, linear_mode: LinearMode) -> float:
        """All linear layers but the LM head for `num_rows` token rows (the FP8-able part of eq. 5)."""
        if num_rows <= 0:
            return 0.0
        spec = self.spec(hw)
        key = (spec.key, num_rows, linear_mode)
        t = self._linear_cache.get(key)
        if t is None:
            kind = GemmKind.for_linear_mode(linear_mode)
            total = 0.0  # the sum over the layer's GEMMs in order, as sum() adds them (0.0 + x is 0 + x)
            for k, n in self._layer_gemms:
                total += self._gemm(spec, num_rows, k, n, kind)
            t = self.model.num_layers * total
            if len(self._linear_cache) > _CACHE_MAX:
                self._linear_cache.clear()
            self._linear_cache[key] = t
        return t

    def lm_head_time_s(self, hw: str | HardwareSpec, num_rows: int) -> float:
        """The LM head (always bf16) over `num_rows` rows that need logits."""
        if num_rows <= 0:
            return 0.0
        return self._gemm(self.spec(hw), num_rows, self.model.hidden_size, self.model.vocab_size, GemmKind.BF16)

    def elementwise_time_s(self, hw: str | HardwareSpec, num_rows: int, phase: Phase = Phase.DECODE) -> float:
        """Non-GEMM time of one step over `num_rows` token rows: the activation traffic of norms,
        residuals, RoPE and SiLU·mul at measured bandwidth (× elementwise_factor), plus layers × the
        phase's per-layer overhead (both calibrated from whole forward steps; 1 and 0 by default)."""
        spec = self.spec(hw)
        m = self.model
        elems = _ELEMENTWISE_H * m.hidden_size + _ELEMENTWISE_AI * m.intermediate_size
        traffic = num_rows * m.num_layers * elems * _ACT_BYTES / (spec.measured_mem_bw_tbps * 1e12)
        per_layer = spec.prefill_layer_overhead_s if phase is Phase.PREFILL else spec.decode_layer_overhead_s
        return traffic * spec.elementwise_factor + m.num_layers * per_layer

    def _attention_time_s(self, spec: HardwareSpec, flops: float, kv_read_bytes: float) -> float:
        compute = flops / (spec.peak_bf16_tflops * 1e12 * spec.attention_efficiency)
        memory = kv_read_bytes / (spec.measured_mem_bw_tbps * 1e12)
        return max(compute, memory)

    def _attention_flops(self, new_tokens: int, context_tokens: int) -> float:
        """QKᵀ and PV FLOPs of `new_tokens` causal queries after `context_tokens` cached ones (eq. 2/5)."""
        m = self.model
        s, c = new_tokens, context_tokens
        return 2.0 * m.num_layers * m.num_heads * m.head_dim * (s * s + 2.0 * s * c)

    # ---------------------------------------------------------------- phases
    def prefill_time_s(
        self,
        hw: str | HardwareSpec,
        num_tokens: int,
        *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        context_tokens: int = 0,
        kv_dtype: KVDtype = KVDtype.FP8_E4M3,
    ) -> float:
        """Seconds to prefill `num_tokens` new tokens of one request after `context_tokens` cached ones."""
        _check_count("num_tokens", num_tokens, minimum=1)
        _check_count("context_tokens", context_tokens)
        return self._prefill_one(self.spec(hw), num_tokens, context_tokens, linear_mode, kv_dtype)

    def _prefill_one(self, spec: HardwareSpec, num_tokens: int, context_tokens: int, mode: LinearMode,
                     kv_dtype: KVDtype) -> float:
        """`_prefill` of one sequence, memoised (prefill_time_s and one-prompt prefill_batch_time_s share it)."""
        key = (spec.key, num_tokens, context_tokens, mode, kv_dtype)
        t = self._prefill1.get(key)
        if t is None:
            if len(self._prefill1) > _CACHE_MAX:
                self._prefill1.clear()
            t = self._prefill1[key] = self._prefill(spec, [(num_tokens, context_tokens)], mode, kv_dtype)
        return t

    def prefill_batch_time_s(
        self,
        hw: str | HardwareSpec,
        token_counts: Sequence[int],
        *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        kv_dtype: KVDtype = KVDtype.FP8_E4M3,
    ) -> float:
        """Seconds of one batched prefill iteration over whole prompts of `token_counts` tokens."""
        if len(token_counts) == 0:
            raise InvalidCostQuery("prefill_batch_time_s needs at least one prompt")
        for n in token_counts:
            _check_count("token_counts[i]", n, minimum=1)
        if len(token_counts) == 1:
            return self._prefill_one(self.spec(hw), token_counts[0], 0, linear_mode, kv_dtype)
        return self._prefill(self.spec(hw), [(n, 0) for n in token_counts], linear_mode, kv_dtype)

    def _prefill(
        self, spec: HardwareSpec, seqs: Sequence[tuple[int, int]], mode: LinearMode, kv_dtype: KVDtype
    ) -> float:
        rows = sum(s for s, _ in seqs)
        flops = sum(self._attention_flops(s, c) for s, c in seqs)
        kv_rw = sum(self.kv_bytes(s + c, kv_dtype) for s, c in seqs)  # read the context, write the new
        return (
            spec.step_overhead_s
            + self.linear_time_s(spec, rows, mode)
            + self.lm_head_time_s(spec, len(seqs))
            + self._attention_time_s(spec, flops, kv_rw)
            + self.elementwise_time_s(spec, rows, Phase.PREFILL)
        )

    def prefill_layer_time_s(
        self, hw: str | HardwareSpec, num_tokens: int, *, linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        context_tokens: int = 0, kv_dtype: KVDtype = KVDtype.FP8_E4M3,
    ) -> float:
        """Seconds of one transformer layer of a prefill (the pace at which layer KV becomes ready)."""
        spec = self.spec(hw)
        total = self.prefill_time_s(
            spec, num_tokens, linear_mode=linear_mode, context_tokens=context_tokens, kv_dtype=kv_dtype
        )
        return (total - spec.step_overhead_s - self.lm_head_time_s(spec, 1)) / self.model.num_layers

    def decode_step_time_s(
        self,
        hw: str | HardwareSpec,
        context_lens: Sequence[int],
        *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        kv_dtype: KVDtype = KVDtype.FP8_E4M3,
    ) -> float:
        """Seconds of one continuous-batching decode step: one new token for each sequence.

        context_lens[i] is the number of tokens already in sequence i's KV cache.
        """
        b = len(context_lens)
        if b == 0:
            raise InvalidCostQuery("decode_step_time_s needs at least one sequence")
        if min(context_lens) < 0:
            raise InvalidCostQuery(f"context_lens must be >= 0, got {min(context_lens)!r}")
        return self.decode_step_time_sum_s(
            hw, b, sum(context_lens), linear_mode=linear_mode, kv_dtype=kv_dtype, _checked=True
        )

    def decode_step_time_sum_s(
        self,
        hw: str | HardwareSpec,
        num_seqs: int,
        total_context_tokens: int,
        *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        kv_dtype: KVDtype = KVDtype.FP8_E4M3,
        _checked: bool = False,
    ) -> float:
        """`decode_step_time_s` from the batch size and the sum of the context lengths alone (the step
        time depends on nothing else): O(1), for a simulator that keeps running sums."""
        if not _checked and not (num_seqs >= 1 and total_context_tokens >= 0):
            raise InvalidCostQuery(
                f"need num_seqs >= 1 and total_context_tokens >= 0, got {num_seqs!r}, {total_context_tokens!r}"
            )
        spec = self.spec(hw)
        parts = self._decode_fixed.get((spec.key, num_seqs, linear_mode))
        if parts is None:
            parts = (
                spec.step_overhead_s,
                self.linear_time_s(spec, num_seqs, linear_mode),
                self.lm_head_time_s(spec, num_seqs),
                self.elementwise_time_s(spec, num_seqs),
            )
            self._decode_fixed[(spec.key, num_seqs, linear_mode)] = parts
        # eq. 5's attention term 4·l·H·d·Σc; KV reads of Σc cached tokens plus the b new ones.
        flops = self._attn_flops_per_ctx * total_context_tokens
        kv_read = self._kv_bytes_per_token[kv_dtype] * (total_context_tokens + num_seqs)
        # (summed in this order on purpose: orchestrator/sim/costs.py reassembles it bit for bit)
        return parts[0] + parts[1] + parts[2] + self._attention_time_s(spec, flops, kv_read) + parts[3]

    # ---------------------------------------------------------------- KV bytes and transfer
    def _kv_bytes_one_token(self, kv_dtype: KVDtype) -> int:
        m = self.model
        per_head = m.head_dim * kv_dtype.bytes_per_element + (FP8_SCALE_BYTES if kv_dtype.is_fp8 else 0)
        return 2 * m.num_layers * m.num_kv_heads * per_head  # K and V

    def kv_bytes(self, num_tokens: int, kv_dtype: KVDtype) -> int:
        """Bytes of KV for `num_tokens` tokens, all layers, K and V; FP8 adds one float32 scale per
        token per KV head for each of K and V (the wire's default scale layout)."""
        _check_count("num_tokens", num_tokens)
        return num_tokens * self._kv_bytes_per_token[kv_dtype]

    def kv_transfer_time_s(
        self, num_tokens: int, kv_dtype: KVDtype, link: str | LinkSpec | None = None
    ) -> float:
        """Seconds to move the KV of `num_tokens` tokens over `link` in one piece (latency + bytes/bw)."""
        ln = self.link(link)
        return ln.latency_s + self.kv_bytes(num_tokens, kv_dtype) / (ln.bandwidth_gb_per_s * 1e9)

    def exposed_transfer_time_s(
        self,
        hw_prefill: str | HardwareSpec,
        num_tokens: int,
        kv_dtype: KVDtype,
        link: str | LinkSpec | None = None,
        *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
    ) -> float:
        """Transfer time left after the prefill ends when KV streams layer by layer.

        Layer i's KV (bytes X/L, x = X/(L·bw) on the wire) is ready when layer i ends, at
        o + (i+1)·p (o: step overhead, p: one layer's time); layers go out in order on one link, so the
        last byte lands at o + max_i((i+1)·p + (L−i)·x) + latency = o + L·p + x + (L−1)·max(0, x−p) + λ.
        The prefill ends at o + L·p + t_lm_head, so the exposed time is
            max(0, x + (L−1)·max(0, x − p) + λ − t_lm_head):
        one layer's transfer when the link keeps up, plus the whole overhang when it does not.
        """
        spec = self.spec(hw_prefill)
        ln = self.link(link)
        ckey = (spec.key, num_tokens, kv_dtype, ln.key, linear_mode)
        hit = self._exposed_cache.get(ckey)
        if hit is not None and self.catalog.links.get(ln.key) is ln:
            return hit
        _check_count("num_tokens", num_tokens, minimum=1)
        layers = self.model.num_layers
        p = self.prefill_layer_time_s(spec, num_tokens, linear_mode=linear_mode, kv_dtype=kv_dtype)
        x = self.kv_bytes(num_tokens, kv_dtype) / (ln.bandwidth_gb_per_s * 1e9) / layers
        tail = self.lm_head_time_s(spec, 1)
        exposed = max(0.0, x + (layers - 1) * max(0.0, x - p) + ln.latency_s - tail)
        if ln.key in self.catalog.links and self.catalog.links[ln.key] is ln:  # cache catalog links only
            if len(self._exposed_cache) > _CACHE_MAX:
                self._exposed_cache.clear()
            self._exposed_cache[ckey] = exposed
        return exposed

    # ---------------------------------------------------------------- memory
    def weight_bytes(self, hw: str | HardwareSpec, linear_mode: LinearMode) -> int:
        """Bytes of weights resident on one device: linear layers at 1 byte (FP8, plus a float32 scale
        per output channel) or 2 bytes (bf16 or FP8 fallback); LM head and embedding in bf16."""
        m = self.model
        fp8 = linear_mode.is_fp8 and self.spec(hw).has_fp8
        out_channels = m.num_layers * sum(n for _, n in self._layer_gemms)
        linear = m.linear_params * (1 if fp8 else 2) + (out_channels * 4 if fp8 else 0)
        embed = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size * 2
        return linear + m.lm_head_params * 2 + embed

    def kv_capacity_tokens(
        self, hw: str | HardwareSpec, kv_dtype: KVDtype, linear_mode: LinearMode = LinearMode.FP8_DYNAMIC,
        mem_fraction: float = 0.9,
    ) -> int:
        """Tokens of KV that fit in `mem_fraction` of device memory (GB = 1e9 bytes) after the weights;
        0 when the weights alone do not fit."""
        if not (0.0 < mem_fraction <= 1.0):
            raise InvalidCostQuery(f"mem_fraction must be in (0, 1], got {mem_fraction!r}")
        spec = self.spec(hw)
        free = spec.mem_gb * 1e9 * mem_fraction - self.weight_bytes(spec, linear_mode)
        return max(0, int(free // self._kv_bytes_per_token[kv_dtype]))

    # ---------------------------------------------------------------- power and energy
    def power_w(self, hw: str | HardwareSpec, phase: Phase, utilization: float) -> float:
        """Board power: idle_w at utilization 0 (or in Phase.IDLE), rising linearly to the phase's
        full-load power (prefill_power_w, decode_power_w) at utilization 1."""
        if not (0.0 <= utilization <= 1.0) or math.isnan(utilization):
            raise InvalidCostQuery(f"utilization must be in [0, 1], got {utilization!r}")
        spec = self.spec(hw)
        try:
            phase = Phase(phase)
        except ValueError:
            raise InvalidCostQuery(f"phase must be one of {[p.value for p in Phase]}, got {phase!r}") from None
        if phase is Phase.IDLE:
            return spec.idle_w
        full = spec.prefill_power_w if phase is Phase.PREFILL else spec.decode_power_w
        return spec.idle_w + utilization * (full - spec.idle_w)

    def energy_j(self, hw: str | HardwareSpec, phase: Phase, duration_s: float, utilization: float = 1.0) -> float:
        """Joules drawn over `duration_s` at constant power (power_w × time)."""
        if not (duration_s >= 0.0) or math.isinf(duration_s):
            raise InvalidCostQuery(f"duration_s must be finite and >= 0, got {duration_s!r}")
        return self.power_w(hw, phase, utilization) * duration_s

    def joules_per_token(
        self, hw: str | HardwareSpec, phase: Phase, duration_s: float, num_tokens: int, utilization: float = 1.0
    ) -> float:
        """Energy of a phase of `duration_s` divided over the `num_tokens` tokens it produced/consumed."""
        _check_count("num_tokens", num_tokens, minimum=1)
        return self.energy_j(hw, phase, duration_s, utilization) / num_tokens

    def decode_joules_per_token(
        self, hw: str | HardwareSpec, context_lens: Sequence[int], *,
        linear_mode: LinearMode = LinearMode.FP8_DYNAMIC, kv_dtype: KVDtype = KVDtype.FP8_E4M3,
    ) -> float:
        """Joules per generated token of one decode step over this batch, at full decode power."""
        t = self.decode_step_time_s(hw, context_lens, linear_mode=linear_mode, kv_dtype=kv_dtype)
        return self.joules_per_token(hw, Phase.DECODE, t, len(context_lens))


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidCostQuery(f"{name} must be an integer >= {minimum}, got {value!r}")

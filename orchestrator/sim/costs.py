"""The cost-model calls of the simulator's hot loop, made cheap without changing their answers.

`SimCosts` wraps the core's `CostModel` and answers the three questions the event handlers ask:

- `prefill_batch_time_s(hw, token_counts, linear_mode=…)`: passed through; a batch of one prompt is
  memoised per (hw, tokens, mode) — the same call, the same answer.
- `exposed_transfer_time_s(...)`: memoised per (hw, tokens, kv dtype, link, mode).
- `decode_step_time_totals_s(hw, batch, total_context, …)`: one decode step from the batch size and
  the *sum* of the context lengths. `CostModel.decode_step_time_s` depends on its list only through
  these two numbers (its attention term is linear in Σ context, everything else is per row); the
  simulator keeps Σ context incrementally, so a step costs O(1) instead of O(batch). This method is
  assembled from the cost model's own pieces, in the same order of operations, so it returns the
  very same float; `tests/unit/sim/test_costs.py` checks that bit for bit on random batches for
  every catalog device, linear mode and KV dtype, and fails if the cost model's formula changes.
  The core now has the same O(1) entry point (`CostModel.decode_step_time_sum_s`); this class keeps
  its own decomposition because the simulator's decode runs inline it per step
  (`step_coefficients`): a method call with keywords and a spec lookup per step cost more than the
  step's arithmetic. The test above keeps the two bit-identical.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from orchestrator.core.types import KVDtype, LinearMode

_MEMO_MAX = 500_000


class SimCosts:
    """Memoised / O(1) views of a CostModel for the simulator (answers identical to the model's)."""

    def __init__(self, cost_model: Any) -> None:
        self.model = cost_model
        self._single_prefill: dict[tuple[Any, int, LinearMode], float] = {}
        self._transfer: dict[tuple[Any, int, KVDtype, Any, LinearMode], float] = {}
        self._per_row: dict[tuple, tuple[float, float, float, float, int]] = {}
        self._plans: dict[tuple, tuple[float, float, float, float, int, bool]] = {}
        m = cost_model.model
        self._attn_flops_per_ctx = 4.0 * m.num_layers * m.num_heads * m.head_dim
        self._kv_per_token = dict(cost_model._kv_bytes_per_token)

    # -------------------------------------------------------------- pass-through with memo
    def prefill_batch_time_s(self, hw: Any, token_counts: list[int], *, linear_mode: LinearMode) -> float:
        if len(token_counts) == 1:
            key = (hw, token_counts[0], linear_mode)
            t = self._single_prefill.get(key)
            if t is None:
                if len(self._single_prefill) > _MEMO_MAX:
                    self._single_prefill.clear()
                t = self._single_prefill[key] = self.model.prefill_batch_time_s(
                    hw, token_counts, linear_mode=linear_mode)
            return t
        return self.model.prefill_batch_time_s(hw, token_counts, linear_mode=linear_mode)

    def exposed_transfer_time_s(self, hw_prefill: Any, num_tokens: int, kv_dtype: KVDtype, link: Any = None,
                                *, linear_mode: LinearMode) -> float:
        key = (hw_prefill, num_tokens, kv_dtype, getattr(link, "key", link), linear_mode)
        t = self._transfer.get(key)
        if t is None:
            if len(self._transfer) > _MEMO_MAX:
                self._transfer.clear()
            t = self._transfer[key] = self.model.exposed_transfer_time_s(
                hw_prefill, num_tokens, kv_dtype, link, linear_mode=linear_mode)
        return t

    def decode_step_time_s(self, hw: Any, context_lens: list[int], *, linear_mode: LinearMode,
                           kv_dtype: KVDtype) -> float:
        return self.model.decode_step_time_s(hw, context_lens, linear_mode=linear_mode, kv_dtype=kv_dtype)

    # -------------------------------------------------------------- the O(1) decode step
    def decode_step_time_totals_s(self, hw: str, batch: int, total_context: int, *, linear_mode: LinearMode,
                                  kv_dtype: KVDtype) -> float:
        """`CostModel.decode_step_time_s(hw, lens)` for any `lens` of length `batch` summing to
        `total_context` (same float: same terms, added in the same order)."""
        c = self._per_row.get((hw, batch, linear_mode, kv_dtype)) or self.step_coefficients(
            hw, batch, linear_mode=linear_mode, kv_dtype=kv_dtype)
        compute = self._attn_flops_per_ctx * total_context / c[2]
        memory = c[4] * (total_context + batch) / c[3]
        return c[0] + (compute if compute > memory else memory) + c[1]

    def step_coefficients(self, hw: str, batch: int, *, linear_mode: LinearMode,
                          kv_dtype: KVDtype) -> tuple[float, float, float, float, int]:
        """(head_s, elementwise_s, attention FLOP/s, memory B/s, KV bytes/token) of a decode step of
        `batch` sequences: a step over Σ context c takes
        `head_s + max(flops_per_ctx·c / FLOP/s, kv_bytes·(c + batch) / B/s) + elementwise_s`, added in
        that order (what `decode_step_time_totals_s` computes; the simulator's decode runs inline it)."""
        key = (hw, batch, linear_mode, kv_dtype)
        c = self._per_row.get(key)
        if c is None:
            cm = self.model
            spec = cm.spec(hw)
            # overhead + linear + lm_head, then attention, then elementwise: the model's order
            head = spec.step_overhead_s + cm.linear_time_s(spec, batch, linear_mode) + cm.lm_head_time_s(spec, batch)
            c = self._per_row[key] = (head, cm.elementwise_time_s(spec, batch), spec.peak_bf16_tflops * 1e12 *
                                      spec.attention_efficiency, spec.measured_mem_bw_tbps * 1e12,
                                      self._kv_per_token[kv_dtype])
        return c

    def step_plan(self, hw: str, batch: int, *, linear_mode: LinearMode,
                  kv_dtype: KVDtype) -> tuple[float, float, float, float, int, bool]:
        """`step_coefficients(...)` plus `memory_bound`: True when, for every Σ context c ≥ 0 of a batch
        of ≥ 1 sequences, the float comparison `compute > memory` of a step is False (so a step is
        `head_s + kv_bytes·(c + batch) / B/s + elementwise_s`, the same float, without the compute
        term). Decided in exact rationals with a margin of 1e-9, far above the few ulps of rounding
        in either term: `kv_bytes / B/s ≥ (1 + 1e-9) · flops_per_ctx / FLOP/s`."""
        key = (hw, batch, linear_mode, kv_dtype)
        plan = self._plans.get(key)
        if plan is None:
            c = self.step_coefficients(hw, batch, linear_mode=linear_mode, kv_dtype=kv_dtype)
            bound = Fraction(c[4]) * Fraction(c[2]) >= (
                Fraction(1) + Fraction(1, 10**9)) * Fraction(self._attn_flops_per_ctx) * Fraction(c[3])
            plan = self._plans[key] = (*c, bool(bound))
        return plan

    @property
    def attention_flops_per_context_token(self) -> float:
        return self._attn_flops_per_ctx

"""Cost model arithmetic: KV bytes, transfer and its layer-wise overlap, power and energy, capacity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.cost_model import CostModel, InvalidCostQuery
from orchestrator.core.hardware import LinkSpec, Phase
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import KVDtype, LinearMode, TandemError

L8B = PRESETS["llama-3.1-8b-shape"]  # 32 layers, 8 KV heads, head_dim 128


def test_kv_bytes_bf16_and_fp8_with_scales(cost8b):
    # bf16: K and V, 32 layers, 8 heads, 128 dims, 2 bytes each.
    assert cost8b.kv_bytes(1, KVDtype.BF16) == 2 * 32 * 8 * 128 * 2 == 131072
    # fp8: 1 byte per element plus one float32 scale per token per KV head, for K and for V.
    assert cost8b.kv_bytes(1, KVDtype.FP8_E4M3) == 2 * 32 * 8 * (128 + 4) == 67584
    assert cost8b.kv_bytes(1000, KVDtype.FP8_E5M2) == 1000 * 67584
    assert cost8b.kv_bytes(0, KVDtype.BF16) == 0
    # fp8 is a bit more than half of bf16 because of the scales: (128 + 4) / 256.
    assert cost8b.kv_bytes(4096, KVDtype.FP8_E4M3) / cost8b.kv_bytes(4096, KVDtype.BF16) == pytest.approx(132 / 256)
    with pytest.raises(InvalidCostQuery):
        cost8b.kv_bytes(-1, KVDtype.BF16)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth(cost8b):
    link = LinkSpec("t", "test", bandwidth_gb_per_s=10.0, latency_s=1e-3)
    t = cost8b.kv_transfer_time_s(1000, KVDtype.FP8_E4M3, link)
    assert t == pytest.approx(1e-3 + 1000 * 67584 / 10e9)
    # by key, and the catalog default (100 GbE, 12.5 GB/s)
    d = cost8b.kv_transfer_time_s(1000, KVDtype.BF16)
    assert d == pytest.approx(2e-5 + 1000 * 131072 / 12.5e9)
    assert cost8b.kv_transfer_time_s(1000, KVDtype.BF16, "eth-400g") < d


def _streamed_finish_s(layer_ready_s: list[float], per_layer_wire_s: float, latency_s: float) -> float:
    """Independent event simulation: layer KV goes out in order on one FIFO link as it becomes ready."""
    link_free = 0.0
    for ready in layer_ready_s:
        link_free = max(link_free, ready) + per_layer_wire_s
    return link_free + latency_s


@pytest.mark.parametrize("bw_gb_per_s", [0.5, 2.0, 12.5, 50.0, 400.0])
@pytest.mark.parametrize("num_tokens", [128, 4096])
def test_exposed_transfer_matches_a_layer_by_layer_simulation(cost8b, bw_gb_per_s, num_tokens):
    link = LinkSpec("t", "test", bandwidth_gb_per_s=bw_gb_per_s, latency_s=5e-5)
    spec = cost8b.spec("h100-sxm")
    prefill = cost8b.prefill_time_s(spec, num_tokens)
    p = cost8b.prefill_layer_time_s(spec, num_tokens)
    ready = [spec.step_overhead_s + (i + 1) * p for i in range(L8B.num_layers)]
    x = cost8b.kv_bytes(num_tokens, KVDtype.FP8_E4M3) / (bw_gb_per_s * 1e9) / L8B.num_layers
    finish = _streamed_finish_s(ready, x, link.latency_s)
    # the last layer ends before the LM head and the prefill's end
    assert ready[-1] < prefill
    expected = max(0.0, finish - prefill)
    got = cost8b.exposed_transfer_time_s(spec, num_tokens, KVDtype.FP8_E4M3, link)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # never more than sending it all after the prefill, never less than zero
    assert 0.0 <= got <= cost8b.kv_transfer_time_s(num_tokens, KVDtype.FP8_E4M3, link) + 1e-12


def test_one_request_cost_is_prefill_plus_exposed_transfer_plus_first_decode_step(cost8b):
    """TTFT of a lone disaggregated request, recomputed from first principles, equals the sum the
    router and the simulator use."""
    prompt = 3000
    link = cost8b.link("eth-100g")
    spec_p, spec_d = cost8b.spec("h100-sxm"), cost8b.spec("gaudi2")
    prefill = cost8b.prefill_time_s(spec_p, prompt)
    p = cost8b.prefill_layer_time_s(spec_p, prompt)
    ready = [spec_p.step_overhead_s + (i + 1) * p for i in range(L8B.num_layers)]
    x = cost8b.kv_bytes(prompt, KVDtype.FP8_E4M3) / (link.bandwidth_gb_per_s * 1e9) / L8B.num_layers
    kv_landed = max(prefill, _streamed_finish_s(ready, x, link.latency_s))
    ttft_first_principles = kv_landed + cost8b.decode_step_time_s(spec_d, [prompt])
    ttft_sum = (
        cost8b.prefill_time_s("h100-sxm", prompt)
        + cost8b.exposed_transfer_time_s("h100-sxm", prompt, KVDtype.FP8_E4M3, "eth-100g")
        + cost8b.decode_step_time_s("gaudi2", [prompt])
    )
    assert ttft_sum == pytest.approx(ttft_first_principles, rel=1e-12)
    # and the streamed hand-off hides most of the transfer: far less than sending it afterwards
    assert ttft_sum < prefill + cost8b.kv_transfer_time_s(prompt, KVDtype.FP8_E4M3, link) + cost8b.decode_step_time_s(
        "gaudi2", [prompt]
    )


def test_power_is_linear_between_idle_and_phase_power(cost8b, catalog):
    h = catalog["h100-sxm"]
    assert cost8b.power_w("h100-sxm", Phase.IDLE, 0.7) == h.idle_w
    assert cost8b.power_w("h100-sxm", Phase.PREFILL, 0.0) == h.idle_w
    assert cost8b.power_w("h100-sxm", Phase.PREFILL, 1.0) == h.prefill_power_w
    assert cost8b.power_w("h100-sxm", Phase.DECODE, 1.0) == h.decode_power_w
    assert cost8b.power_w("h100-sxm", Phase.DECODE, 0.5) == pytest.approx((h.idle_w + h.decode_power_w) / 2)
    # the reference measurement: decode-shaped work on an H100 draws 500-700 W, not a copy's ~400 W
    assert 500 <= cost8b.power_w("h100-sxm", Phase.DECODE, 1.0) <= 700
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(InvalidCostQuery):
            cost8b.power_w("h100-sxm", Phase.DECODE, bad)


def test_energy_is_power_times_time(cost8b):
    for hw in ("h100-sxm", "gaudi2", "l4"):
        for phase in Phase:
            for u in (0.0, 0.3, 1.0):
                w = cost8b.power_w(hw, phase, u)
                assert cost8b.energy_j(hw, phase, 2.5, u) == pytest.approx(w * 2.5)
                assert cost8b.joules_per_token(hw, phase, 2.5, 10, u) == pytest.approx(w * 2.5 / 10)
    t = cost8b.decode_step_time_s("gaudi2", [1000] * 32)
    assert cost8b.decode_joules_per_token("gaudi2", [1000] * 32) == pytest.approx(
        cost8b.power_w("gaudi2", Phase.DECODE, 1.0) * t / 32
    )
    with pytest.raises(InvalidCostQuery):
        cost8b.energy_j("h100-sxm", Phase.DECODE, -1.0)
    with pytest.raises(InvalidCostQuery):
        cost8b.joules_per_token("h100-sxm", Phase.DECODE, 1.0, 0)


def test_times_grow_with_work_and_fp8_beats_bf16_on_prefill(cost8b):
    for hw in ("h100-sxm", "gaudi2", "l4"):
        ts = [cost8b.prefill_time_s(hw, n) for n in (1, 128, 1024, 8192)]
        assert ts == sorted(ts) and ts[0] > 0
        ds = [cost8b.decode_step_time_s(hw, [c] * 8) for c in (0, 1000, 10000, 100000)]
        assert ds == sorted(ds)
        bs = [cost8b.decode_step_time_s(hw, [1000] * b) for b in (1, 8, 64, 256)]
        assert bs == sorted(bs)
        assert cost8b.prefill_time_s(hw, 4096) < cost8b.prefill_time_s(hw, 4096, linear_mode=LinearMode.BF16)
        # fp8 KV halves the attention reads of long-context decode
        assert cost8b.decode_step_time_s(hw, [32000] * 16) < cost8b.decode_step_time_s(
            hw, [32000] * 16, kv_dtype=KVDtype.BF16
        )
    # a batched prefill costs no more than its prompts one after another, and more than the longest alone
    batch = [512, 1024, 2048]
    assert cost8b.prefill_batch_time_s("h100-sxm", batch) < sum(cost8b.prefill_time_s("h100-sxm", n) for n in batch)
    assert cost8b.prefill_batch_time_s("h100-sxm", batch) > cost8b.prefill_time_s("h100-sxm", 2048)
    # context makes a chunked prefill's attention dearer
    assert cost8b.prefill_time_s("h100-sxm", 512, context_tokens=8192) > cost8b.prefill_time_s("h100-sxm", 512)


def test_a100_fp8_falls_back_to_bf16_and_is_flagged(cost8b):
    assert cost8b.is_fp8_fallback("a100", LinearMode.FP8_DYNAMIC)
    assert not cost8b.is_fp8_fallback("h100-sxm", LinearMode.FP8_DYNAMIC)
    assert cost8b.prefill_time_s("a100", 2048) == cost8b.prefill_time_s("a100", 2048, linear_mode=LinearMode.BF16)
    assert cost8b.weight_bytes("a100", LinearMode.FP8_DYNAMIC) == cost8b.weight_bytes("a100", LinearMode.BF16)


def test_kv_capacity_after_weights(cost8b, catalog):
    # 8B in fp8 on an 80 GB H100: weights ≈ 7 GB of fp8 linears + 2 × 1.05 GB of bf16 embedding/LM head
    w = cost8b.weight_bytes("h100-sxm", LinearMode.FP8_DYNAMIC)
    assert 8.5e9 < w < 9.5e9
    cap = cost8b.kv_capacity_tokens("h100-sxm", KVDtype.FP8_E4M3, LinearMode.FP8_DYNAMIC, mem_fraction=0.9)
    assert cap == int((80e9 * 0.9 - w) // 67584)
    assert cost8b.kv_capacity_tokens("h100-sxm", KVDtype.BF16, LinearMode.FP8_DYNAMIC) < cap
    assert cost8b.kv_capacity_tokens("h100-sxm", KVDtype.FP8_E4M3, LinearMode.BF16) < cap
    # 70B in bf16 does not fit a 24 GB L4 at all
    c70 = CostModel(PRESETS["llama-3.1-70b-shape"], catalog)
    assert c70.kv_capacity_tokens("l4", KVDtype.FP8_E4M3, LinearMode.BF16) == 0
    with pytest.raises(InvalidCostQuery):
        cost8b.kv_capacity_tokens("h100-sxm", KVDtype.FP8_E4M3, mem_fraction=0.0)


def test_bad_queries_get_typed_errors(cost8b):
    for call in (
        lambda: cost8b.prefill_time_s("h100-sxm", 0),
        lambda: cost8b.prefill_time_s("h100-sxm", 10, context_tokens=-1),
        lambda: cost8b.prefill_batch_time_s("h100-sxm", []),
        lambda: cost8b.prefill_batch_time_s("h100-sxm", [10, -3]),
        lambda: cost8b.decode_step_time_s("h100-sxm", []),
        lambda: cost8b.decode_step_time_s("h100-sxm", [5, -1]),
        lambda: cost8b.decode_step_time_s("tpu-v9", [5]),
        lambda: cost8b.kv_transfer_time_s(10, KVDtype.BF16, "carrier-pigeon"),
        lambda: cost8b.power_w("h100-sxm", "napping", 0.5),
    ):
        with pytest.raises(TandemError):
            call()


def test_specs_from_another_load_of_the_same_catalog_are_accepted_foreign_ones_refused(cost8b):
    from orchestrator.core.hardware import HardwareCatalog

    other = HardwareCatalog.load_default()["gaudi2"]  # equal, not identical
    assert cost8b.decode_step_time_s(other, [100, 200]) == cost8b.decode_step_time_s("gaudi2", [100, 200])
    tampered = other.with_overrides(measured_mem_bw_tbps=0.5)
    with pytest.raises(InvalidCostQuery, match="differs"):
        cost8b.decode_step_time_s(tampered, [100])


def test_decode_from_sums_equals_decode_from_lists(cost8b):
    ctx = [0, 17, 4096, 100000, 3]
    for hw in ("h100-sxm", "gaudi2", "a100"):
        for kv in (KVDtype.BF16, KVDtype.FP8_E4M3):
            assert cost8b.decode_step_time_sum_s(hw, len(ctx), sum(ctx), kv_dtype=kv) == cost8b.decode_step_time_s(
                hw, ctx, kv_dtype=kv
            )
    with pytest.raises(InvalidCostQuery):
        cost8b.decode_step_time_sum_s("h100-sxm", 0, 10)


_HW = st.sampled_from(["h100-sxm", "h200", "gaudi2", "gaudi3", "l4", "a100"])
_MODE = st.sampled_from(list(LinearMode))
_KV = st.sampled_from(list(KVDtype))


@settings(max_examples=150, deadline=None)
@given(hw=_HW, mode=_MODE, kv=_KV, ctx=st.lists(st.integers(0, 200_000), min_size=1, max_size=300),
       extra=st.integers(1, 5000), i=st.integers(0, 10_000))
def test_decode_step_properties(cost8b, hw, mode, kv, ctx, extra, i):
    t = cost8b.decode_step_time_s(hw, ctx, linear_mode=mode, kv_dtype=kv)
    assert t > 0 and math.isfinite(t)
    longer = list(ctx)
    longer[i % len(ctx)] += extra
    assert cost8b.decode_step_time_s(hw, longer, linear_mode=mode, kv_dtype=kv) >= t
    assert cost8b.decode_step_time_s(hw, [*ctx, 0], linear_mode=mode, kv_dtype=kv) >= t
    assert cost8b.decode_step_time_s(hw, list(reversed(ctx)), linear_mode=mode, kv_dtype=kv) == t


@settings(max_examples=150, deadline=None)
@given(hw=_HW, mode=_MODE, kv=_KV, n=st.integers(1, 130_000), bw=st.floats(0.05, 1000), lat=st.floats(0, 1e-2))
def test_prefill_and_transfer_properties(cost8b, hw, mode, kv, n, bw, lat):
    p = cost8b.prefill_time_s(hw, n, linear_mode=mode, kv_dtype=kv)
    assert 0 < p < cost8b.prefill_time_s(hw, n + 1, linear_mode=mode, kv_dtype=kv) + 1e-15
    link = LinkSpec("h", "hypothesis", bandwidth_gb_per_s=bw, latency_s=lat)
    exposed = cost8b.exposed_transfer_time_s(hw, n, kv, link, linear_mode=mode)
    assert 0.0 <= exposed <= cost8b.kv_transfer_time_s(n, kv, link) + 1e-12
    # a faster link never exposes more
    fast = LinkSpec("f", "faster", bandwidth_gb_per_s=bw * 2, latency_s=lat)
    assert cost8b.exposed_transfer_time_s(hw, n, kv, fast, linear_mode=mode) <= exposed + 1e-15

"""Acceptance 2: prefill on engine A, export, import on engine B (other block size), decode = colocated."""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.types import FinishReason, KVDtype, LinearMode, SamplingParams
from workers.engine import ops
from workers.kv_payload import KVCapacityError, KVImportError, KVLayerPayload, KVLayoutMismatch, KVSink

from .factories import greedy, make_engine, prompts, run_to_end

KV_DTYPES = [KVDtype.BF16, KVDtype.FP8_E4M3, KVDtype.FP8_E5M2]


def _colocated(kv_dtype, prompt, sampling, **kw):
    eng = make_engine(kv_dtype=kv_dtype, block_size=16, **kw)
    return eng.generate([prompt], sampling)[0]


def _disaggregated(kv_dtype, prompt, sampling, reverse=False, chunk=None, **kw):
    a = make_engine(kv_dtype=kv_dtype, block_size=16, **kw)
    b = make_engine(kv_dtype=kv_dtype, block_size=5, **kw)
    export = a.prefill_export("r1", prompt, sampling)
    assert a.num_free_blocks == a.num_total_blocks  # prefill-only holds nothing
    assert export.first_token_id is not None and export.num_tokens == len(prompt)
    assert [p.layer for p in export.layers] == list(range(a.model_config.num_layers))
    b.reserve_kv("r1", export.layout, export.num_tokens, max_new_tokens=sampling.max_tokens)
    layers = list(reversed(export.layers)) if reverse else export.layers
    for p in layers:
        if chunk is None:
            b.write_kv_layer("r1", p)
            continue
        for s in range(0, p.num_tokens, chunk):  # a transport may deliver a layer in token ranges
            sl = slice(s, s + chunk)
            b.write_kv_layer("r1", KVLayerPayload(
                p.layer, s, p.k[sl], p.v[sl],
                None if p.k_scale is None else p.k_scale[sl], None if p.v_scale is None else p.v_scale[sl]))
    b.add_request_from_kv("r1", prompt, export.first_token_id, sampling)
    return run_to_end(b)["r1"]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda k: k.value)
def test_disaggregated_greedy_equals_colocated(kv_dtype):
    prompt = prompts(1, base_len=37)[0]
    sampling = greedy(20)
    colocated = _colocated(kv_dtype, prompt, sampling)
    assert len(colocated) == 20 and len(set(colocated)) > 3
    assert _disaggregated(kv_dtype, prompt, sampling) == colocated
    assert _disaggregated(kv_dtype, prompt, sampling, reverse=True, chunk=7) == colocated


@pytest.mark.parametrize("kv_dtype", [KVDtype.BF16, KVDtype.FP8_E4M3], ids=lambda k: k.value)
def test_disaggregated_seeded_sampling_equals_colocated(kv_dtype):
    prompt = prompts(1, base_len=21)[0]
    sampling = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    colocated = _colocated(kv_dtype, prompt, sampling)
    assert _disaggregated(kv_dtype, prompt, sampling) == colocated


def test_disaggregated_fp8_linear_equals_colocated():
    prompt = prompts(1, base_len=19)[0]
    kw = dict(linear_mode=LinearMode.FP8_DYNAMIC)
    assert _disaggregated(KVDtype.FP8_E4M3, prompt, greedy(12), **kw) == _colocated(
        KVDtype.FP8_E4M3, prompt, greedy(12), **kw)


def test_import_kv_convenience_and_stop_on_first_token():
    a, b = make_engine(kv_dtype=KVDtype.FP8_E4M3), make_engine(kv_dtype=KVDtype.FP8_E4M3, block_size=8)
    prompt = prompts(1)[0]
    assert isinstance(b, KVSink)
    export = a.prefill_export("x", prompt, greedy(1))
    b.import_kv(export, greedy(1))
    assert b.step() == [("x", export.first_token_id, FinishReason.LENGTH)]
    # a stop token equal to the first token ends the request at once
    export = a.prefill_export("y", prompt, greedy(5))
    stop = SamplingParams(max_tokens=5, stop_token_ids=(export.first_token_id,))
    b.import_kv(export, stop)
    assert b.step() == [("y", export.first_token_id, FinishReason.STOP)]
    assert not b.has_unfinished()


def test_layers_stream_as_soon_as_computed():
    """on_layer(i) is called before layer i+1's attention runs (the transport can overlap)."""
    calls = {"attn": 0}

    def counting_attention(q, k, v, sm_scale):
        calls["attn"] += 1
        return ops.prefill_attention(q, k, v, sm_scale)

    ops.register_backend("counting-test", {"prefill_attention": counting_attention}, device_type="test")
    try:
        eng = make_engine(ops_backend="counting-test")
        seen = []
        eng.prefill_export("s", prompts(1)[0], greedy(3), on_layer=lambda p: seen.append((p.layer, calls["attn"])))
    finally:
        ops.unregister_backend("counting-test")
    assert seen == [(i, i) for i in range(eng.model_config.num_layers)]


def test_import_rejects_other_model_and_bad_payloads():
    a = make_engine(kv_dtype=KVDtype.FP8_E4M3)
    other = make_engine(kv_dtype=KVDtype.FP8_E4M3, seed=7)  # same shapes, other weights
    prompt = prompts(1, base_len=9)[0]
    export = a.prefill_export("r", prompt, greedy(4))
    with pytest.raises(KVLayoutMismatch, match="model_fingerprint"):
        other.reserve_kv("r", export.layout, export.num_tokens)
    bf16 = make_engine(kv_dtype=KVDtype.BF16)
    with pytest.raises(KVImportError, match="transcode"):
        bf16.import_kv(export, greedy(4))
    b = make_engine(kv_dtype=KVDtype.FP8_E4M3, block_size=4)
    b.reserve_kv("r", export.layout, export.num_tokens)
    p0 = export.layers[0]
    with pytest.raises(KVImportError, match="shape"):
        b.write_kv_layer("r", KVLayerPayload(0, 0, p0.k[:, :1], p0.v, p0.k_scale, p0.v_scale))
    with pytest.raises(KVImportError, match="float32"):
        b.write_kv_layer("r", KVLayerPayload(0, 0, p0.k, p0.v, None, None))
    with pytest.raises(KVImportError, match="torch.bfloat16|is torch"):
        b.write_kv_layer("r", KVLayerPayload(0, 0, p0.k.to(torch.bfloat16), p0.v, p0.k_scale, p0.v_scale))
    with pytest.raises(KVImportError, match="outside the reservation"):
        b.write_kv_layer("r", KVLayerPayload(0, 5, p0.k, p0.v, p0.k_scale, p0.v_scale))
    with pytest.raises(KVImportError, match="layer out of range"):
        b.write_kv_layer("r", KVLayerPayload(9, 0, p0.k, p0.v, p0.k_scale, p0.v_scale))
    b.write_kv_layer("r", p0)
    with pytest.raises(KVImportError, match="already written"):
        b.write_kv_layer("r", p0)
    with pytest.raises(KVImportError, match="incomplete"):
        b.add_request_from_kv("r", prompt, export.first_token_id, greedy(4))
    with pytest.raises(KVImportError, match="no KV reservation"):
        b.write_kv_layer("unknown", p0)
    b.release_kv("r")
    b.release_kv("r")  # idempotent
    assert b.num_free_blocks == b.num_total_blocks


def test_reserve_capacity_and_topup_errors_keep_state_clean():
    a = make_engine()
    b = make_engine(num_blocks=4, block_size=4)  # 16 tokens of KV in all
    prompt = prompts(1, base_len=6)[0]
    export = a.prefill_export("r", prompt, greedy(4))
    b.reserve_kv("hold", export.layout, 8)  # 2 blocks
    with pytest.raises(KVCapacityError):
        b.reserve_kv("r", export.layout, export.num_tokens, max_new_tokens=8)  # needs 4
    b.reserve_kv("r", export.layout, export.num_tokens)  # 2 blocks: fits
    for p in export.layers:
        b.write_kv_layer("r", p)
    from workers.engine.errors import EngineCapacityError

    with pytest.raises(EngineCapacityError, match="more blocks"):
        b.add_request_from_kv("r", prompt, export.first_token_id, greedy(8))
    b.release_kv("hold")
    b.add_request_from_kv("r", prompt, export.first_token_id, greedy(8))
    assert len(run_to_end(b)["r"]) == 8

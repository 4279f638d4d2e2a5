"""VLLMEngine and the native Engine in this process: FP8 and bf16 KV between them, failures, one engine per process.

vLLM's FP8 cache has one scale per layer (1.0 here), the native cache one per token and head, so the
two engines' own generations differ after a few tokens. What must hold: the decode side continues
exactly the prefill side's KV — native prefill -> vLLM decode equals monolithic native, and vLLM
prefill -> native decode equals monolithic vLLM — through the translation of scales both ways.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(300)]


def _run(engine, rid):
    toks = []
    while engine.has_unfinished():
        toks += [o.token_id for o in engine.step() if o.request_id == rid]
    return toks


def test_fp8_kv_crosses_between_engines_with_scale_translation(tiny_llama):
    from orchestrator.core.types import KVDtype, SamplingParams, TandemError
    from workers.engine import Engine, EngineConfig
    from workers.kv_payload import KVImportError
    from workers.vllm_engine import VLLMEngine, VLLMEngineConfig

    v = VLLMEngine(VLLMEngineConfig(model=str(tiny_llama), num_blocks=64, kv_dtype=KVDtype.FP8_E4M3))
    try:
        n = Engine(EngineConfig(model=str(tiny_llama), kv_dtype=KVDtype.FP8_E4M3))
        assert v.kv_layout == n.kv_layout and v.kv_dtype is KVDtype.FP8_E4M3
        sp = SamplingParams(max_tokens=12, ignore_eos=True)
        ids = n.tokenizer.encode("KV blocks travel as FP8 over gRPC between heterogeneous accelerators")
        v.add_request("mono", ids, sp)
        mono_v = _run(v, "mono")
        mono_n = n.generate([ids], sp)[0]

        def disagg(src, dst, rid):
            dst.reserve_kv(rid, src.kv_layout, len(ids), sp.max_tokens)
            seen = []

            def on_layer(payload):
                assert payload.k_scale is not None and payload.k.dtype.itemsize == 1
                seen.append(payload.layer)
                dst.write_kv_layer(rid, payload)

            ex = src.prefill_export(rid, ids, sp, on_layer=on_layer)
            assert sorted(set(seen)) == list(range(n.model_config.num_layers))
            dst.add_request_from_kv(rid, ids, ex.first_token_id, sp)
            return _run(dst, rid)

        assert disagg(n, v, "n2v") == mono_n
        assert disagg(v, n, "v2n") == mono_v
        for e in (v, n):
            e.assert_no_leaks()

        # a stream that fails mid-prefill (the dispatcher cancelled it, the peer died): the error
        # surfaces typed from prefill_export, vLLM aborts the request and holds no block
        class StreamGone(TandemError):
            pass

        def failing(payload):
            if payload.layer == 1:
                raise StreamGone("peer went away")

        with pytest.raises(StreamGone):
            v.prefill_export("broken", ids, sp, on_layer=failing)
        v.assert_no_leaks()
        # a reservation whose KV never completes is refused, then released without a trace
        v.reserve_kv("partial", n.kv_layout, len(ids), 4)
        with pytest.raises(KVImportError, match="incomplete"):
            v.add_request_from_kv("partial", ids, 5, sp)
        v.release_kv("partial")
        v.assert_no_leaks()
    finally:
        v.shutdown()



def test_bf16_vllm_after_a_shutdown_interoperates(tiny_llama):
    """A second engine may start once the first shut down; bf16 runs vLLM's AMX cache layout here."""
    from orchestrator.core.types import ComputeDtype, SamplingParams
    from workers.engine import Engine, EngineConfig
    from workers.vllm_engine import VLLMEngine, VLLMEngineConfig

    v = VLLMEngine(VLLMEngineConfig(model=str(tiny_llama), num_blocks=64, dtype=ComputeDtype.BF16))
    try:
        n = Engine(EngineConfig(model=str(tiny_llama), dtype=ComputeDtype.BF16))
        sp = SamplingParams(max_tokens=8, ignore_eos=True)
        ids = n.tokenizer.encode("the decode pool emits one token at a time")
        v.reserve_kv("n2v", n.kv_layout, len(ids), sp.max_tokens)
        ex = n.prefill_export("n2v", ids, sp, on_layer=lambda p: v.write_kv_layer("n2v", p))
        v.add_request_from_kv("n2v", ids, ex.first_token_id, sp)
        got = _run(v, "n2v")
        assert len(got) == 8 and got[0] == ex.first_token_id
        # bf16 arithmetic differs between the engines; the continuation agrees with native on this prompt
        assert got == n.generate([ids], sp)[0]
        v.assert_no_leaks()
    finally:
        v.shutdown()


def test_a_second_vllm_engine_in_one_process_is_refused(tiny_llama):
    from workers.vllm_engine.config import VLLMConfigError, VLLMEngineConfig
    from workers.vllm_engine.engine import _LIVE_ENGINES, VLLMEngine

    _LIVE_ENGINES.add(-1)  # stands for another live engine in this process
    try:
        with pytest.raises(VLLMConfigError, match="one KV connector per process"):
            VLLMEngine(VLLMEngineConfig(model=str(tiny_llama), num_blocks=64))
    finally:
        _LIVE_ENGINES.discard(-1)

"""Acceptance 1 with the real engine: export from engine A (block 16), push through a real gRPC server on
127.0.0.1 while prefill computes, import into engine B (another block size): greedy continuation is
identical to a monolithic engine, for bf16 and fp8_e4m3 KV. Plus engine-side leak checks on faults."""

from __future__ import annotations

import time

import pytest

from orchestrator.core.types import FinishReason, KVDtype, SamplingParams
from tests.wire.fakes import TOKEN
from workers.kv_transfer.client import KVTransferClient
from workers.kv_transfer.errors import LeaseExpired, TransferCancelled
from workers.kv_transfer.server import KVTransferServer

engine_mod = pytest.importorskip("workers.engine")
Engine, EngineConfig = engine_mod.Engine, engine_mod.EngineConfig

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(37)]  # 37 tokens: not a multiple of any block size
SAMPLING = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(kv_dtype: KVDtype, block_size: int):
    return Engine(EngineConfig(model="tiny", kv_dtype=kv_dtype, block_size=block_size, num_blocks=64))


def _wait(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def _drain(engine, rid: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(SAMPLING.max_tokens + 2):
        for out in engine.step():
            assert out.request_id == rid and out.finish_reason is not FinishReason.ERROR
            tokens.append(out.token_id)
            if out.finish_reason is not None:
                return tokens
    raise AssertionError("decode did not finish")


@pytest.mark.parametrize("kv_dtype", [KVDtype.BF16, KVDtype.FP8_E4M3])
@pytest.mark.parametrize("decode_block_size", [8, 32])
def test_engine_to_engine_over_grpc_matches_monolithic(kv_dtype, decode_block_size):
    expected = _engine(kv_dtype, 16).generate([PROMPT], SAMPLING)[0]
    prefill, decode = _engine(kv_dtype, 16), _engine(kv_dtype, decode_block_size)
    completed = {}
    server = KVTransferServer(decode, lambda rid, s: completed.setdefault(rid, s), auth_token=TOKEN)
    server.start()
    try:
        with KVTransferClient(server.address, auth_token=TOKEN) as client:
            client.handshake(prefill.kv_layout)
            server.reserve("req", prefill.kv_layout, len(PROMPT), lease_s=30, max_new_tokens=SAMPLING.max_tokens)
            stream = client.open_stream("req", prefill.kv_layout, prefill.kv_dtype, PROMPT, src_block_size=16)
            export = prefill.prefill_export("req", PROMPT, SAMPLING, on_layer=stream.send_layer)
            ack = stream.finish(export.first_token_id)
    finally:
        server.stop(0)
    summary = completed["req"]
    assert ack.num_tokens == len(PROMPT) and summary.first_token_id == export.first_token_id
    assert summary.bytes_received == export.nbytes()  # every byte of the export crossed the wire
    decode.add_request_from_kv("req", summary.prompt_token_ids, summary.first_token_id, SAMPLING)
    assert _drain(decode, "req") == expected
    decode.assert_no_leaks()
    prefill.assert_no_leaks()


def test_engine_sink_is_freed_on_receiver_cancel_and_lease_expiry():
    prefill, decode = _engine(KVDtype.FP8_E4M3, 16), _engine(KVDtype.FP8_E4M3, 8)
    failed = {}
    server = KVTransferServer(decode, lambda rid, s: None, on_failure=failed.__setitem__, auth_token=TOKEN)
    server.start()
    try:
        with KVTransferClient(server.address, auth_token=TOKEN) as client:
            server.reserve("c", decode.kv_layout, len(PROMPT))
            assert decode.num_free_blocks < decode.num_total_blocks
            stream = client.open_stream("c", prefill.kv_layout, prefill.kv_dtype, PROMPT)
            calls = []

            def on_layer(p):
                stream.send_layer(p)
                calls.append(p.layer)
                if len(calls) == 1:  # the decode side gives up once the stream is under way
                    _wait(lambda: server.receiver.counts()[0] == 1)
                    server.cancel("c")

            with pytest.raises(TransferCancelled):
                export = prefill.prefill_export("c", PROMPT, SAMPLING, on_layer=on_layer)
                stream.finish(export.first_token_id)
            server.reserve("l", decode.kv_layout, len(PROMPT), lease_s=0.2)
            _wait(lambda: "l" in failed)
    finally:
        server.stop(0)
    assert isinstance(failed["c"], TransferCancelled) and isinstance(failed["l"], LeaseExpired)
    decode.assert_no_leaks()


def test_negative_control_corrupted_kv_changes_the_continuation():
    """The comparison above can fail: KV with one layer's V zeroed decodes to other tokens."""
    from workers.kv_payload import KVLayerPayload
    from workers.kv_transfer.inprocess import InProcessKVTransport

    expected = _engine(KVDtype.BF16, 16).generate([PROMPT], SAMPLING)[0]
    prefill, decode = _engine(KVDtype.BF16, 16), _engine(KVDtype.BF16, 8)
    done = {}
    t = InProcessKVTransport(decode, lambda rid, s: done.setdefault(rid, s))
    t.reserve("x", prefill.kv_layout, len(PROMPT))
    stream = t.open_stream("x", prefill.kv_layout, prefill.kv_dtype, PROMPT)

    def corrupt(p):
        v = p.v * 0 if p.layer == 0 else p.v
        stream.send_layer(KVLayerPayload(p.layer, p.token_start, p.k, v, p.k_scale, p.v_scale))

    export = prefill.prefill_export("x", PROMPT, SAMPLING, on_layer=corrupt)
    stream.finish(export.first_token_id)
    decode.add_request_from_kv("x", PROMPT, export.first_token_id, SAMPLING)
    got = _drain(decode, "x")
    assert got[0] == expected[0]  # the first token came from prefill, untouched
    assert got != expected
    decode.assert_no_leaks()

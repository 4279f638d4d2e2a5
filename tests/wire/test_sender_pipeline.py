"""The gRPC sender's framer thread: it frames ahead of gRPC's sends, ends with the stream, and a
failure inside it fails the transfer (blocks released) instead of hanging it."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.core.types import KVDtype
from tests.wire.fakes import make_payloads
from workers.kv_transfer.client import GrpcKVStream
from workers.kv_transfer.errors import KVTransferError

NUM_TOKENS = 40
PROMPT = list(range(7, 7 + NUM_TOKENS))


def _framers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kv-tx-framer"]


def _wait_no_framers(before: set[threading.Thread], timeout_s: float = 3.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [t for t in _framers() if t not in before]
        if not left:
            return []
        time.sleep(0.02)
    return left


def test_framer_threads_end_after_finish_and_after_abort(server, grpc_client, sink, rec, layout):
    before = set(_framers())
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, NUM_TOKENS)
    server.reserve("done", layout, NUM_TOKENS)
    st = grpc_client.open_stream("done", layout, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
    assert len([t for t in _framers() if t not in before]) == 1  # this stream's framer
    for p in payloads:
        st.send_layer(p)
    assert st.finish(5).num_chunks > len(payloads)  # several frames per layer went through the framer
    assert sink.complete("done")

    server.reserve("gone", layout, NUM_TOKENS)
    st2 = grpc_client.open_stream("gone", layout, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
    st2.send_layer(payloads[0])
    st2.abort()
    assert _wait_no_framers(before) == []
    deadline = time.monotonic() + 3
    while "gone" not in rec.failed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "gone" in rec.failed and "gone" not in rec.completed
    sink.release_kv("done")
    sink.assert_no_leaks()


def test_an_error_while_framing_fails_the_transfer_and_frees_the_blocks(server, grpc_client, sink, rec, layout,
                                                                       monkeypatch):
    real = GrpcKVStream.frames_of

    def frames_then_fail(self, payload, first_seq):
        if payload.layer == 1:
            raise RuntimeError("framing broke")
        return real(self, payload, first_seq)

    monkeypatch.setattr(GrpcKVStream, "frames_of", frames_then_fail)
    before = set(_framers())
    payloads = make_payloads(layout, KVDtype.BF16, NUM_TOKENS)
    server.reserve("bad", layout, NUM_TOKENS)
    st = grpc_client.open_stream("bad", layout, KVDtype.BF16, PROMPT, chunk_bytes=1024)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        for p in payloads:
            st.send_layer(p)
        st.finish(1)
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 3
    while "bad" not in rec.failed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "bad" in rec.failed and "bad" not in rec.completed
    assert _wait_no_framers(before) == []
    sink.assert_no_leaks()

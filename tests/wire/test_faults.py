"""Faults end in a typed error and every reserved block free again (FakeSink.assert_no_leaks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from orchestrator.core.types import KVDtype
from tests.wire.conftest import Recorder, push_raw
from tests.wire.fakes import TOKEN, FakeSink, make_layout, make_payloads
from workers.kv_payload import KVCapacityError
from workers.kv_transfer.client import KVTransferClient
from workers.kv_transfer.errors import (
    ChecksumError,
    FrameError,
    LeaseExpired,
    TransferCancelled,
    TransferDeadlineExceeded,
    UnknownTransfer,
)
from workers.kv_transfer.fp8 import WireDtype
from workers.kv_transfer.sender import encode_payload
from workers.kv_transfer.server import KVTransferServer
from workers.kv_transfer.wire import PROTOCOL_VERSION, encode_finish, encode_open

ROOT = Path(__file__).resolve().parents[2]
N = 40
PROMPT = list(range(N))


def wait_for(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def raw_frames(layout, rid="r", kv_dtype=KVDtype.FP8_E4M3, chunk_bytes=1024) -> list[bytes]:
    """A valid OPEN, CHUNK..., FINISH sequence."""
    wire = WireDtype.E4M3FN if kv_dtype is KVDtype.FP8_E4M3 else WireDtype.BF16
    frames = [encode_open(rid, layout.compat_hash(PROTOCOL_VERSION), wire, N, layout.num_layers, layout.num_kv_heads,
                          layout.head_dim, PROMPT)]
    nbytes = 0
    for p in make_payloads(layout, kv_dtype, N):
        for f in encode_payload(rid, p, wire, len(frames) - 1, chunk_bytes):
            frames.append(f)
            nbytes += len(f) - 12 - int.from_bytes(f[8:12], "big")
    frames.append(encode_finish(rid, len(frames) - 1, 5, len(frames) - 1, nbytes))
    return frames


def _assert_failed_and_free(rec, sink, rid, err_type):
    wait_for(lambda: rid in rec.failed)
    assert isinstance(rec.failed[rid], err_type), repr(rec.failed[rid])
    assert rid not in rec.completed
    sink.assert_no_leaks()


def test_valid_raw_sequence_is_accepted(server, sink, rec, layout):
    server.reserve("r", layout, N)
    reply = push_raw(server.address, raw_frames(layout))
    assert isinstance(reply, bytes) and "r" in rec.completed


def test_checksum_flip(server, sink, rec, layout):
    server.reserve("r", layout, N)
    frames = raw_frames(layout)
    bad = bytearray(frames[2])
    bad[-5] ^= 0x01
    frames[2] = bytes(bad)
    assert isinstance(push_raw(server.address, frames), ChecksumError)
    _assert_failed_and_free(rec, sink, "r", ChecksumError)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda f: f[:3] + [f[2]] + f[3:], "duplicate"),  # a chunk sent twice
        (lambda f: f[:2] + f[3:], "out-of-order"),  # a chunk skipped
        (lambda f: f[:2] + [f[3], f[2]] + f[4:], "out-of-order"),  # two chunks swapped
        (lambda f: f[:-3], "truncated stream"),  # the sender stopped without FINISH
        (lambda f: [f[0], f[0]] + f[1:], "duplicate open"),
        (lambda f: f[1:], "must start with an open frame"),
    ],
)
def test_stream_order_faults(server, sink, rec, layout, edit, needle):
    server.reserve("r", layout, N)
    err = push_raw(server.address, edit(raw_frames(layout)))
    assert isinstance(err, FrameError), err
    assert needle in str(err)
    if needle == "must start with an open frame":
        assert server.receiver.counts() == (0, 1)  # nothing claimed: reservation untouched
        server.cancel("r")
    _assert_failed_and_free(rec, sink, "r", (FrameError, TransferCancelled))


def test_open_with_another_layout_hash_fails_and_frees(server, sink, rec, layout):
    server.reserve("r", layout, N)
    frames = raw_frames(make_layout(num_kv_heads=2, head_dim=16, rope_theta=1.0))
    err = push_raw(server.address, frames)
    assert type(err).__name__ == "KVLayoutMismatch" and "handshake()" in str(err)
    _assert_failed_and_free(rec, sink, "r", type(err))


def test_finish_with_a_missing_layer_is_truncation(server, sink, rec, layout):
    server.reserve("r", layout, N)
    frames = raw_frames(layout, chunk_bytes=1 << 20)  # one chunk per layer
    frames = [frames[0], frames[1], frames[2], encode_finish("r", 2, 5, 2, 0)]
    err = push_raw(server.address, frames)
    assert isinstance(err, FrameError) and "layers [2] incomplete" in str(err)
    _assert_failed_and_free(rec, sink, "r", FrameError)


def test_nan_encodings_are_rejected(server, sink, rec, layout):
    server.reserve("r", layout, N)
    p = make_payloads(layout, KVDtype.FP8_E4M3, N)[0]
    p.k.view(torch.uint8)[3, 1, 2] = 0x7F  # e4m3fn NaN
    frames = raw_frames(layout, chunk_bytes=1 << 20)
    frames[1] = encode_payload("r", p, WireDtype.E4M3FN, 0, 1 << 20)[0]
    err = push_raw(server.address, frames)
    assert isinstance(err, FrameError) and "NaN" in str(err)
    _assert_failed_and_free(rec, sink, "r", FrameError)


def test_receiver_cancel_mid_stream(server, client, sink, rec, layout):
    server.reserve("r", layout, N)
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, N)
    st = client.open_stream("r", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(payloads[0])
    wait_for(lambda: len(sink.raw.get("r", [])) == 1)
    assert server.cancel("r")
    with pytest.raises(TransferCancelled):
        for p in payloads[1:]:
            st.send_layer(p)
        st.finish(1)
    _assert_failed_and_free(rec, sink, "r", TransferCancelled)
    assert client.health().ok  # the server keeps serving


def test_sender_cancel_rpc_and_abort(server, client, sink, rec, layout):
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, N)
    server.reserve("a", layout, N)
    st = client.open_stream("a", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(payloads[0])
    wait_for(lambda: len(sink.raw.get("a", [])) == 1)
    assert client.cancel("a") is True
    assert client.cancel("a") is False  # already gone
    with pytest.raises(TransferCancelled):
        st.finish(1)
    server.reserve("b", layout, N)
    st = client.open_stream("b", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(payloads[0])
    wait_for(lambda: len(sink.raw.get("b", [])) == 1)
    st.abort()
    _assert_failed_and_free(rec, sink, "b", TransferCancelled)


def test_lease_expires_before_the_stream(server, sink, rec, layout):
    server.reserve("r", layout, N, lease_s=0.2)
    assert sink.reserved
    _assert_failed_and_free(rec, sink, "r", LeaseExpired)


def test_lease_expires_mid_stream(server, client, sink, rec, layout):
    server.reserve("r", layout, N, lease_s=0.6)
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, N)
    st = client.open_stream("r", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(payloads[0])
    _assert_failed_and_free(rec, sink, "r", LeaseExpired)
    # the sender learns it as a cut stream; on a very slow box the lease may even run out before
    # the OPEN frame arrives, and then the receiver no longer knows the request
    with pytest.raises((TransferCancelled, LeaseExpired, UnknownTransfer)):
        st.send_layer(payloads[1])
        st.finish(1)


def test_deadline(server, client, sink, rec, layout):
    server.reserve("r", layout, N)
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, N)
    st = client.open_stream("r", layout, KVDtype.FP8_E4M3, PROMPT, deadline_s=0.5)
    st.send_layer(payloads[0])
    time.sleep(0.8)
    with pytest.raises(TransferDeadlineExceeded):
        st.send_layer(payloads[1])
        st.finish(1)
    _assert_failed_and_free(rec, sink, "r", (TransferDeadlineExceeded, TransferCancelled))


@pytest.mark.parametrize("data_plane", [True, False], ids=["data", "grpc"])
def test_sender_killed_mid_stream(server, sink, rec, layout, data_plane):
    server.reserve("r", layout, N)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from orchestrator.core.types import KVDtype
        from tests.wire.fakes import make_layout, make_payloads
        from workers.kv_transfer.client import KVTransferClient
        lay = make_layout()
        cl = KVTransferClient({server.address!r}, auth_token={TOKEN!r}, data_plane={data_plane!r})
        st = cl.open_stream("r", lay, KVDtype.FP8_E4M3, list(range({N})))
        st.send_layer(make_payloads(lay, KVDtype.FP8_E4M3, {N})[0])
        print("sent", flush=True)
        sys.stdin.readline()  # the test says when: after the receiver got the first layer
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "sent"
        wait_for(lambda: len(sink.raw.get("r", [])) >= 1, timeout_s=30)
        proc.stdin.write("die\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_failed_and_free(rec, sink, "r", (TransferCancelled, FrameError))
    assert len(sink.released) == 1


@pytest.mark.parametrize("data_plane", [True, False], ids=["data", "grpc"])
def test_flow_control_bounds_the_sender_queue(data_plane):
    n = 1024  # 2 MiB of fp8 K+V per layer, 16 MiB in all: more than gRPC buffers in flight

    class SlowSink(FakeSink):
        def write_kv_layer(self, request_id, payload):
            time.sleep(0.1 * payload.num_tokens / n)  # 0.1 s per layer, however it is chunked
            super().write_kv_layer(request_id, payload)

    lay = make_layout(num_layers=8, num_kv_heads=8, head_dim=128)  # 2 MiB of fp8 K+V per layer, 16 MiB in all: more than gRPC buffers in flight
    sink = SlowSink(lay, num_blocks=1024)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, auth_token=TOKEN)
    srv.start()
    try:
        with KVTransferClient(srv.address, auth_token=TOKEN, data_plane=data_plane) as cl:
            srv.reserve("r", lay, n)
            bound = 256 * 1024
            st = cl.open_stream("r", lay, KVDtype.FP8_E4M3, list(range(n)), chunk_bytes=64 * 1024,
                                max_queue_bytes=bound)
            peak, t0 = 0, time.perf_counter()
            for p in make_payloads(lay, KVDtype.FP8_E4M3, n):
                st.send_layer(p)
                peak = max(peak, st.queued_bytes)
            sending_s = time.perf_counter() - t0
            st.finish(1)
    finally:
        srv.stop(0)
    layer_bytes = n * 8 * 128 * 2 + n * 8 * 4 * 2  # K+V fp8 and their scales
    assert peak <= bound + layer_bytes  # the queue takes a payload only while under its bound
    # the receiver needs >= 0.8 s (8 layers x 0.1 s); a sender without backpressure would finish
    # queuing in a few ms. It must have been held back for a good part of that.
    assert sending_s >= 0.3, sending_s
    assert "r" in rec.completed


def test_receiver_memory_budget(layout):
    sink = FakeSink(layout)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, auth_token=TOKEN, max_inflight_bytes=1000)
    srv.start()
    try:
        srv.reserve("r", layout, N)
        err = push_raw(srv.address, raw_frames(layout))
        assert isinstance(err, KVCapacityError) and "max_inflight_bytes" in str(err)
        assert srv.receiver.counts() == (0, 1)  # the reservation stays for a retry
    finally:
        srv.stop(0)
    sink.assert_no_leaks()  # stop() released it


@pytest.mark.parametrize("data_plane", [True, False], ids=["data", "grpc"])
def test_stop_releases_live_transfers(layout, data_plane):
    sink = FakeSink(layout)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    cl = KVTransferClient(srv.address, auth_token=TOKEN, data_plane=data_plane)
    srv.reserve("r", layout, N)
    st = cl.open_stream("r", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(make_payloads(layout, KVDtype.FP8_E4M3, N)[0])
    wait_for(lambda: len(sink.raw.get("r", [])) == 1)
    srv.stop(0)
    _assert_failed_and_free(rec, sink, "r", TransferCancelled)
    with pytest.raises((TransferCancelled, Exception)):
        st.finish(1)
    cl.close()


def test_in_process_deadline_and_abort_free_the_blocks(layout):
    from workers.kv_transfer.inprocess import InProcessKVTransport

    sink = FakeSink(layout)
    rec = Recorder()
    t = InProcessKVTransport(sink, rec.on_complete, on_failure=rec.on_failure)
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, N)
    t.reserve("d", layout, N)
    st = t.open_stream("d", layout, KVDtype.FP8_E4M3, PROMPT, deadline_s=0.05)
    time.sleep(0.1)
    with pytest.raises(TransferDeadlineExceeded):
        st.send_layer(payloads[0])
    t.reserve("a", layout, N)
    st = t.open_stream("a", layout, KVDtype.FP8_E4M3, PROMPT)
    st.send_layer(payloads[0])
    st.abort()
    assert isinstance(rec.failed["d"], TransferDeadlineExceeded) and isinstance(rec.failed["a"], TransferCancelled)
    assert not rec.completed
    sink.assert_no_leaks()


def test_token_configuration(monkeypatch):
    from workers.kv_transfer.errors import TransferAuthError
    from workers.kv_transfer.security import token_from_env

    monkeypatch.delenv("TANDEM_KV_TOKEN", raising=False)
    with pytest.raises(TransferAuthError, match="TANDEM_KV_TOKEN"):
        token_from_env()
    monkeypatch.setenv("TANDEM_KV_TOKEN", "from-the-env-123")
    assert token_from_env() == "from-the-env-123"
    with pytest.raises(TransferAuthError, match="at least 8"):
        KVTransferServer(FakeSink(make_layout()), lambda r, s: None, auth_token="short")


def test_reserve_beyond_capacity_is_typed_and_leaves_nothing(layout):
    sink = FakeSink(layout, block_size=8, num_blocks=4)  # 40 tokens need 5 blocks
    srv = KVTransferServer(sink, lambda r, s: None, auth_token=TOKEN)
    with pytest.raises(KVCapacityError):
        srv.reserve("big", layout, N)
    assert srv.receiver.counts() == (0, 0)
    sink.assert_no_leaks()
    srv.reserve("big", layout, 32)  # 4 blocks fit; the failed id can be reserved again
    assert srv.cancel("big")
    sink.assert_no_leaks()
    srv.stop(0)

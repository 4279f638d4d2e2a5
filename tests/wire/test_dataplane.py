"""The raw-TCP data plane (protocol 3): striped round trips bit-exact, a stripe's connection lost
mid-stream, fuzzed frames and envelopes on every stripe, auth, deadline, window and budget checks.
Every fault ends in a typed error with every reserved block free again."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core.types import KVDtype, TandemError
from tests.wire.conftest import Recorder
from tests.wire.fakes import TOKEN, FakeSink, make_layout, make_payloads
from tests.wire.test_faults import raw_frames, wait_for
from tests.wire.test_fuzz import mutated_frame
from workers.kv_payload import KVCapacityError
from workers.kv_transfer import control
from workers.kv_transfer.client import KVTransferClient
from workers.kv_transfer.dataplane_client import DataPlaneStream
from workers.kv_transfer.dataplane_codec import (
    ENVELOPE,
    HELLO_PREFIX,
    REPLY_PREFIX,
    ReorderWindow,
    _Closed,
    decode_reply_body,
    encode_hello,
    recv_exactly,
)
from workers.kv_transfer.errors import (
    ChecksumError,
    FrameError,
    TransferAuthError,
    TransferCancelled,
    TransferDeadlineExceeded,
)
from workers.kv_transfer.server import KVTransferServer

N = 40
PROMPT = list(range(N))
LAYOUT = make_layout()


def push_data(port: int, frames: list[bytes], *, stripes: int = 1, token: str = TOKEN, rid: str = "r",
              deadline_ms: int = 10_000, assign=None, envelope=None, timeout_s: float = 15.0):
    """Push frames over hand-made data connections (frame i at position i on stripe assign(i));
    returns the receiver's TransferAck or the typed error it replied with (never raises it)."""
    tid = os.urandom(8).hex()
    socks = []
    try:
        for i in range(stripes):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            socks.append(s)
            s.sendall(encode_hello(token, rid, tid, i, stripes, deadline_ms))
        try:
            for pos, f in enumerate(frames):
                env = envelope(pos, f) if envelope else ENVELOPE.pack(len(f), pos)
                socks[assign(pos) if assign else pos % stripes].sendall(env + f)
        except OSError:
            pass  # the receiver gave up on the stream: its reply says why
        head = bytearray(REPLY_PREFIX.size)
        recv_exactly(socks[0], memoryview(head))
        body = bytearray(REPLY_PREFIX.unpack(head)[0])
        recv_exactly(socks[0], memoryview(body))
        return decode_reply_body(bytes(body))
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def live():
    sink = FakeSink(LAYOUT)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN, default_lease_s=20)
    srv.start()
    yield srv, sink, rec
    srv.stop(0)


def _failed_and_free(rec, sink, rid, err_type) -> None:
    wait_for(lambda: rid in rec.failed)
    assert isinstance(rec.failed[rid], err_type), repr(rec.failed[rid])
    assert rid not in rec.completed
    sink.assert_no_leaks()


@pytest.mark.parametrize("stripes", [1, 2, 3])
@pytest.mark.parametrize("kv_dtype", [KVDtype.FP8_E4M3, KVDtype.BF16])
def test_striped_round_trip_is_bit_exact(stripes, kv_dtype):
    sink, rec = FakeSink(LAYOUT, kv_dtype), Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    try:
        with KVTransferClient(srv.address, auth_token=TOKEN, data_stripes=stripes) as cl:
            assert cl.health().data_port == srv.data_port > 0
            srv.reserve("r", LAYOUT, N)
            st_ = cl.open_stream("r", LAYOUT, kv_dtype, PROMPT, chunk_bytes=1024)
            assert isinstance(st_, DataPlaneStream) and st_.stripes == stripes
            payloads = make_payloads(LAYOUT, kv_dtype, N, seed=stripes)
            for p in payloads:
                st_.send_layer(p)
            ack = st_.finish(7)
        assert srv._data is not None and srv._data.connections_accepted == stripes
    finally:
        srv.stop(0)
    # every thread of both sides ends: framer, senders, reply reader, readers, verifier, acceptor
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("kv-dp-")], timeout_s=5)
    assert ack.num_chunks == st_.seq > stripes * 3  # many frames, dealt over every connection
    s = rec.completed["r"]
    assert (s.prompt_token_ids, s.first_token_id, s.bytes_received) == (PROMPT, 7, ack.bytes_received)
    for p in payloads:  # the bytes written into the sink are the bytes sent, token range by token range
        got = sorted((q for q in sink.raw["r"] if q.layer == p.layer), key=lambda q: q.token_start)
        assert sum(q.num_tokens for q in got) == N
        for name in ("k", "v", "k_scale", "v_scale"):
            sent = getattr(p, name)
            if sent is None:
                assert all(getattr(q, name) is None for q in got)
                continue
            back = torch.cat([getattr(q, name) for q in got])
            assert back.view(torch.uint8).equal(sent.contiguous().view(torch.uint8)), (p.layer, name)
    sink.release_kv("r")
    sink.assert_no_leaks()


def test_one_stripes_connection_dropping_mid_stream_frees_the_blocks(live):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    payloads = make_payloads(LAYOUT, KVDtype.FP8_E4M3, N)
    with KVTransferClient(srv.address, auth_token=TOKEN, data_stripes=3) as cl:
        st_ = cl.open_stream("r", LAYOUT, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
        st_.send_layer(payloads[0])
        wait_for(lambda: len(sink.raw.get("r", [])) >= 1)
        st_._socks[1].shutdown(socket.SHUT_RDWR)  # the network drops stripe 1 (connection reset/closed)
        with pytest.raises(TransferCancelled, match="stripe 1|connection"):
            for p in payloads[1:]:
                st_.send_layer(p)
            st_.finish(1)
        _failed_and_free(rec, sink, "r", TransferCancelled)
        assert "stripe 1" in str(rec.failed["r"])
        # the server keeps serving, on the data plane too
        srv.reserve("next", LAYOUT, N)
        st2 = cl.open_stream("next", LAYOUT, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
        for p in payloads:
            st2.send_layer(p)
        assert st2.finish(1).num_tokens == N
    sink.release_kv("next")
    sink.assert_no_leaks()
    wait_for(lambda: srv._data.active() == 0)


def test_hand_made_stream_on_two_stripes_is_accepted(live):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    ack = push_data(srv.data_port, raw_frames(LAYOUT, chunk_bytes=1024), stripes=2)
    assert isinstance(ack, control.TransferAck) and "r" in rec.completed
    sink.release_kv("r")


@pytest.mark.parametrize(
    ("kwargs", "err_type", "needle"),
    [
        (dict(token="wrong-token-0123456"), TransferAuthError, "token"),
        (dict(assign=lambda pos: 0 if pos < 3 else 1, envelope=lambda pos, f: ENVELOPE.pack(len(f), pos - (pos >= 3))),
         FrameError, "duplicate frame at stream position 2|out-of-order frame"),  # a position on two stripes
        (dict(assign=lambda pos: 0, envelope=lambda pos, f: ENVELOPE.pack(len(f), min(pos, 1))), FrameError,
         "must increase"),
        (dict(envelope=lambda pos, f: ENVELOPE.pack(1 << 30, pos)), FrameError, "frame length"),
        (dict(envelope=lambda pos, f: ENVELOPE.pack(0, pos)), FrameError, "frame length"),
    ],
)
def test_bad_envelopes_and_hellos_are_typed_and_free(live, kwargs, err_type, needle):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    err = push_data(srv.data_port, raw_frames(LAYOUT, chunk_bytes=1024), stripes=2, **kwargs)
    assert isinstance(err, err_type) and re.search(needle, str(err)), repr(err)
    wait_for(lambda: srv._data.active() == 0)
    if "r" in rec.failed:  # the verifier had claimed the reservation: the error freed it
        _failed_and_free(rec, sink, "r", err_type)
    else:  # the error came before OPEN was verified: the reservation stays for a retry
        assert err_type is not ChecksumError and srv.receiver.counts() == (0, 1)
        assert srv.cancel("r")
    sink.assert_no_leaks()


def test_checksum_flip_on_the_second_stripe(live):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    frames = raw_frames(LAYOUT, chunk_bytes=1024)
    bad = bytearray(frames[3])  # position 3: stripe 1 of 2
    bad[-2] ^= 0x10
    frames[3] = bytes(bad)
    assert isinstance(push_data(srv.data_port, frames, stripes=2), ChecksumError)
    _failed_and_free(rec, sink, "r", ChecksumError)


def test_a_stripe_that_never_connects_hits_the_deadline(live):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    tid = os.urandom(8).hex()
    with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s:
        s.sendall(encode_hello(TOKEN, "r", tid, 0, 2, 400))  # stripe 1 of 2 never comes
        frames = raw_frames(LAYOUT, chunk_bytes=1024)
        s.sendall(ENVELOPE.pack(len(frames[0]), 0) + frames[0] + ENVELOPE.pack(len(frames[2]), 2) + frames[2])
        t0 = time.monotonic()
        head = bytearray(REPLY_PREFIX.size)
        recv_exactly(s, memoryview(head))
        body = bytearray(REPLY_PREFIX.unpack(head)[0])
        recv_exactly(s, memoryview(body))
        assert isinstance(decode_reply_body(bytes(body)), TransferDeadlineExceeded)
        assert time.monotonic() - t0 < 5
    _failed_and_free(rec, sink, "r", TransferDeadlineExceeded)


def test_silent_or_garbage_connections_are_dropped(live):
    srv, sink, _rec = live
    with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        head = bytearray(REPLY_PREFIX.size)
        recv_exactly(s, memoryview(head))
        body = bytearray(REPLY_PREFIX.unpack(head)[0])
        recv_exactly(s, memoryview(body))
        assert isinstance(decode_reply_body(bytes(body)), FrameError)
    with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s:
        s.sendall(HELLO_PREFIX.pack(b"TKVD", 3, 1 << 20))  # a hello too large to read
        assert s.recv(64)  # the typed refusal, then EOF
    with KVTransferClient(srv.address, auth_token=TOKEN) as cl:
        assert cl.health().ok
    sink.assert_no_leaks()


def test_receiver_budget_counts_every_frame_the_data_plane_may_hold(layout):
    sink, rec = FakeSink(layout), Recorder()
    # one frame of this request is at most one layer: 40 x 2 x 16 x 2 (K, V fp8) + scales = 3200 bytes;
    # the gRPC stream holds one (fits in 6000), the data plane over 2 stripes up to 5 (does not)
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN,
                           max_inflight_bytes=6000)
    srv.start()
    try:
        srv.reserve("r", layout, N)
        err = push_data(srv.data_port, raw_frames(layout), stripes=2)
        assert isinstance(err, KVCapacityError) and "max_inflight_bytes" in str(err)
        srv.cancel("r")
        srv.reserve("g", layout, N)
        with KVTransferClient(srv.address, auth_token=TOKEN, data_plane=False) as cl:
            st_ = cl.open_stream("g", layout, KVDtype.FP8_E4M3, PROMPT)
            for p in make_payloads(layout, KVDtype.FP8_E4M3, N):
                st_.send_layer(p)
            st_.finish(1)
        sink.release_kv("g")
    finally:
        srv.stop(0)
    sink.assert_no_leaks()


def test_reorder_window_orders_bounds_and_closes():
    w = ReorderWindow(2)
    w.wait_room(1)
    w.put(1, memoryview(b"b"))
    assert w.pop(0.01) is None  # position 0 missing
    w.put(0, memoryview(b"a"))
    assert bytes(w.pop(0.01)) == b"a" and bytes(w.pop(0.01)) == b"b"
    with pytest.raises(FrameError, match="duplicate"):
        w.put(1, memoryview(b"x"))
    waited = threading.Event()

    def far() -> None:
        with pytest.raises(_Closed):
            w.wait_room(5)  # beyond next (2) + capacity (2): blocks until close
        waited.set()

    t = threading.Thread(target=far, daemon=True)
    t.start()
    time.sleep(0.05)
    assert not waited.is_set()
    w.close()
    t.join(2)
    assert not t.is_alive() and waited.is_set()


@pytest.fixture(scope="module")
def fuzz_server():
    sink = FakeSink(LAYOUT)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN, default_lease_s=20)
    srv.start()
    yield srv, sink, rec
    srv.stop(0)


VALID = raw_frames(LAYOUT, chunk_bytes=1024)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stripes=st.integers(1, 3), where=st.integers(0, len(VALID) - 1),
       bad=mutated_frame() | st.binary(min_size=1, max_size=256),
       stripe_of=st.sampled_from(["round-robin", "all-on-last", "one-on-last"]))
def test_fuzzed_frames_on_every_stripe_are_typed_and_leak_nothing(fuzz_server, stripes, where, bad, stripe_of):
    srv, sink, rec = fuzz_server
    srv.reserve("r", LAYOUT, N)
    frames = list(VALID)
    frames[where] = bad
    assign = {"round-robin": None, "all-on-last": lambda pos: stripes - 1,
              "one-on-last": lambda pos: stripes - 1 if pos == where else 0}[stripe_of]
    out = push_data(srv.data_port, frames, stripes=stripes, assign=assign, deadline_ms=3000)
    assert isinstance(out, control.TransferAck | TandemError), out
    if isinstance(out, control.TransferAck):  # a mutation the format cannot see (e.g. an ignored key)
        assert "r" in rec.completed and sink.complete("r")
        rec.completed.pop("r")
        sink.release_kv("r")
    else:
        wait_for(lambda: "r" not in srv.receiver._res or srv.receiver.counts() == (0, 1))
        srv.cancel("r")  # a no-op unless the stream failed before claiming the reservation
        rec.failed.pop("r", None)
    wait_for(lambda: srv._data.active() == 0 and srv.receiver.counts() == (0, 0))
    sink.assert_no_leaks()
    assert not rec.completed


def test_an_unreachable_data_port_falls_back_to_grpc(live):
    from workers.kv_transfer.client import GrpcKVStream

    srv, sink, rec = live
    with KVTransferClient(srv.address, auth_token=TOKEN) as cl:
        cl.handshake(LAYOUT)  # the handshake reply carries the data port too
        assert cl.data_address() == ("127.0.0.1", srv.data_port)
        srv._data.stop()  # the data port stops answering; gRPC still does
        srv.reserve("r", LAYOUT, N)
        st_ = cl.open_stream("r", LAYOUT, KVDtype.FP8_E4M3, PROMPT)
        assert isinstance(st_, GrpcKVStream) and cl.data_address() is None
        for p in make_payloads(LAYOUT, KVDtype.FP8_E4M3, N):
            st_.send_layer(p)
        assert st_.finish(3).num_tokens == N
    assert "r" in rec.completed
    sink.release_kv("r")
    sink.assert_no_leaks()


@pytest.mark.parametrize("where", ["planner", "framer"])
def test_an_error_while_framing_fails_the_transfer_and_frees_the_blocks(live, monkeypatch, where):
    import workers.kv_transfer.dataplane_client as dpc
    from workers.kv_transfer.errors import KVTransferError
    from workers.kv_transfer.sender import ChunkSpec

    if where == "planner":  # splitting a payload into frames (the plan thread)
        real = dpc.iter_chunk_specs

        def specs_then_fail(rid, payload, *a, **kw):
            if payload.layer == 1:
                raise RuntimeError("framing broke")
            return real(rid, payload, *a, **kw)

        monkeypatch.setattr(dpc, "iter_chunk_specs", specs_then_fail)
    else:  # checksumming a frame (one connection's framer thread)
        real_parts = ChunkSpec.parts

        def parts_then_fail(spec):
            if spec.layer == 1:
                raise RuntimeError("framing broke")
            return real_parts(spec)

        monkeypatch.setattr(ChunkSpec, "parts", parts_then_fail)
    srv, sink, rec = live
    srv.reserve("bad", LAYOUT, N)
    with KVTransferClient(srv.address, auth_token=TOKEN) as cl:
        st_ = cl.open_stream("bad", LAYOUT, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
        with pytest.raises(KVTransferError, match="framing broke"):
            for p in make_payloads(LAYOUT, KVDtype.FP8_E4M3, N):
                st_.send_layer(p)
            st_.finish(1)
    _failed_and_free(rec, sink, "bad", TransferCancelled)  # the stream's Cancel RPC freed it
    wait_for(lambda: srv._data.active() == 0)


def test_a_connection_that_never_sends_open_is_ended(live, monkeypatch):
    import workers.kv_transfer.dataplane as dp

    monkeypatch.setattr(dp, "OPEN_TIMEOUT_S", 0.3)
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, N)
    with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s:
        s.sendall(encode_hello(TOKEN, "r", os.urandom(8).hex(), 0, 1, 600_000))  # then silence
        head = bytearray(REPLY_PREFIX.size)
        recv_exactly(s, memoryview(head))
        body = bytearray(REPLY_PREFIX.unpack(head)[0])
        recv_exactly(s, memoryview(body))
        err = decode_reply_body(bytes(body))
    assert isinstance(err, TransferDeadlineExceeded) and "no OPEN frame" in str(err)
    wait_for(lambda: srv._data.active() == 0)
    assert srv.receiver.counts() == (0, 1)  # the reservation was never claimed: it stays for the real stream
    assert srv.cancel("r")
    sink.assert_no_leaks()

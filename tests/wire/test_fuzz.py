"""Hypothesis fuzzing of every decoder of peer input, down to a live server that keeps serving."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core.types import KVDtype, TandemError
from tests.wire.conftest import Recorder, push_raw
from tests.wire.fakes import FakeSink, make_layout
from tests.wire.test_faults import raw_frames
from workers.kv_transfer import control
from workers.kv_transfer.errors import FrameError
from workers.kv_transfer.receiver import KVReceiver
from workers.kv_transfer.wire import PREFIX, ChunkFrame, FinishFrame, OpenFrame, decode_frame

LAYOUT = make_layout()
VALID = raw_frames(LAYOUT, chunk_bytes=1024)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=20,
)
header_keys = st.sampled_from(["rid", "seq", "lay", "tok", "dt", "scale", "bs", "len", "crc", "eop", "hash",
                               "ntok", "nlay", "heads", "hdim", "plen", "first", "nchunks", "nbytes"])


@st.composite
def mutated_frame(draw) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID)))
    op = draw(st.sampled_from(["flip", "truncate", "extend", "header", "prefix"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        frame = frame[: draw(st.integers(0, len(frame) - 1))]
    elif op == "extend":
        frame += draw(st.binary(min_size=1, max_size=64))
    elif op == "header":
        hlen = PREFIX.unpack_from(frame, 0)[4]
        header = msgpack.unpackb(bytes(frame[PREFIX.size : PREFIX.size + hlen]))
        header[draw(header_keys)] = draw(msgpack_values)
        hdr = msgpack.packb(header)
        frame = bytearray(PREFIX.pack(*PREFIX.unpack_from(frame, 0)[:4], len(hdr)) + hdr + frame[PREFIX.size + hlen :])
    else:
        frame[: PREFIX.size] = draw(st.binary(min_size=PREFIX.size, max_size=PREFIX.size))
    return bytes(frame)


@FAST
@given(st.binary(max_size=512) | mutated_frame())
def test_decode_frame_returns_a_frame_or_raises_frame_error(data):
    try:
        f = decode_frame(data)
    except FrameError:
        return
    assert isinstance(f, OpenFrame | ChunkFrame | FinishFrame)


@FAST
@given(st.binary(max_size=256) | msgpack_values.map(lambda v: msgpack.packb(v)))
def test_control_decoders_raise_only_frame_error(data):
    for decode in (control.decode_handshake_request, control.decode_handshake_reply, control.decode_cancel,
                   control.decode_health, control.decode_ack):
        with contextlib.suppress(FrameError):  # anything else (TypeError, KeyError...) fails the test
            decode(data)


@st.composite
def mutated_stream(draw) -> list[bytes]:
    frames = list(VALID)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["mutate", "drop", "dup", "swap", "garbage"]))
        i = draw(st.integers(0, len(frames) - 1))
        if op == "mutate":
            frames[i] = draw(mutated_frame())
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(i, draw(st.binary(max_size=64)))
    return frames


@FAST
@given(mutated_stream())
def test_receiver_session_typed_errors_and_no_leaks(frames):
    sink = FakeSink(LAYOUT, KVDtype.FP8_E4M3)
    rec = Recorder()
    receiver = KVReceiver(sink, rec.on_complete, on_failure=rec.on_failure, default_lease_s=60)
    receiver.reserve("r", LAYOUT, 40)
    session = receiver.begin()
    ack = None
    try:
        for f in frames:
            ack = session.feed(f)
            if ack is not None:
                break
        else:
            session.abort(FrameError("truncated stream"))
    except TandemError:
        pass
    if ack is not None:  # the mutation was harmless (e.g. it touched nothing checked): all KV verified
        assert sink.complete("r") and "r" in rec.completed
        sink.release_kv("r")
    receiver.close()
    sink.assert_no_leaks()


@pytest.fixture(scope="module")
def live():
    from tests.wire.fakes import TOKEN
    from workers.kv_transfer.server import KVTransferServer

    sink = FakeSink(LAYOUT, KVDtype.FP8_E4M3, num_blocks=1 << 16)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    yield srv, sink, rec
    srv.stop(0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(frames=mutated_stream())
def test_live_server_survives_fuzzed_streams(live, frames):
    srv, sink, rec = live
    srv.reserve("r", LAYOUT, 40)
    reply = push_raw(srv.address, frames, timeout_s=10)
    assert isinstance(reply, bytes | TandemError), reply
    if isinstance(reply, bytes):
        assert "r" in rec.completed and sink.complete("r")
        rec.completed.pop("r")
        sink.release_kv("r")
    else:
        srv.cancel("r")  # a stream that never opened leaves the reservation for its lease: drop it
    sink.assert_no_leaks()
    assert srv.receiver.counts() == (0, 0)
    # the server still serves a clean transfer
    srv.reserve("ok", LAYOUT, 40)
    assert isinstance(push_raw(srv.address, raw_frames(LAYOUT, rid="ok")), bytes)
    rec.completed.pop("ok")
    sink.release_kv("ok")
    sink.assert_no_leaks()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=128) | msgpack_values.map(lambda v: msgpack.packb(v)),
       method=st.sampled_from(["Handshake", "Cancel"]))
def test_live_control_rpcs_survive_garbage(live, body, method):
    import grpc

    from tests.wire.fakes import TOKEN
    from workers.kv_transfer.client import KVTransferClient, error_from_rpc
    from workers.kv_transfer.security import SERVICE_NAME, TOKEN_METADATA_KEY

    srv, sink, _rec = live
    with grpc.insecure_channel(srv.address) as ch:
        try:
            ch.unary_unary(f"/{SERVICE_NAME}/{method}")(body, timeout=5, metadata=((TOKEN_METADATA_KEY, TOKEN),))
        except grpc.RpcError as e:
            assert isinstance(error_from_rpc(e), FrameError), e
    with KVTransferClient(srv.address, auth_token=TOKEN) as c:
        assert c.health().ok
    sink.assert_no_leaks()

"""The data plane's performance paths: fused CRC32C + value scan (verify.py), scatter-gather sends,
the reader/checker pipeline's memory bound, a fixed data port, and a stripe that joins too late."""

from __future__ import annotations

import socket
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.types import KVDtype
from tests.wire.conftest import Recorder
from tests.wire.fakes import TOKEN, FakeSink, make_layout, make_payloads
from tests.wire.test_faults import raw_frames, wait_for
from workers.kv_transfer import dataplane, verify
from workers.kv_transfer.checksum import crc32c
from workers.kv_transfer.client import KVTransferClient
from workers.kv_transfer.dataplane_client import DataPlaneStream
from workers.kv_transfer.dataplane_codec import (
    ENVELOPE,
    REPLY_PREFIX,
    decode_reply_body,
    encode_hello,
    recv_exactly,
    send_parts,
)
from workers.kv_transfer.errors import ChecksumError, FrameError, TransferCancelled
from workers.kv_transfer.fp8 import WireDtype, has_nonfinite_bytes
from workers.kv_transfer.server import KVTransferServer
from workers.kv_transfer.wire import PREFIX, ChunkFrame, decode_frame

N = 40
PROMPT = list(range(N))
LAYOUT = make_layout()
NONFINITE = {WireDtype.E4M3FN: [0x7F, 0xFF], WireDtype.E4M3_G2: [0x78, 0xFB], WireDtype.E5M2: [0x7C, 0xFE],
             WireDtype.BF16: [0x7F80, 0xFFC1]}


@settings(max_examples=150, deadline=None)
@given(wire=st.sampled_from(list(WireDtype)), n_el=st.integers(0, 700), kv_frac=st.floats(0, 1),
       slice_bytes=st.sampled_from([2, 6, 64, 1000, 1 << 20]), seed=st.integers(0, 2**32 - 1),
       bad_at=st.one_of(st.none(), st.floats(0, 1)))
def test_fused_scan_equals_separate_passes(wire, n_el, kv_frac, slice_bytes, seed, bad_at):
    """One sliced pass gives the CRC32C of every byte and the NaN/Inf verdict of the K/V prefix,
    exactly as a full CRC pass plus a full value pass do, wherever slices and a bad value fall."""
    el = wire.bytes_per_element
    rng = np.random.default_rng(seed)
    dt = np.uint16 if el == 2 else np.uint8
    vals = rng.integers(0, 0x7F00 if el == 2 else 0x70, size=n_el, dtype=dt)  # all finite
    kv_el = int(n_el * kv_frac)
    if bad_at is not None and n_el:
        vals[min(n_el - 1, int(n_el * bad_at))] = NONFINITE[wire][seed % 2]
    payload = memoryview(vals.tobytes())
    crc, bad = verify.scan_payload(payload, kv_el * el, wire, True, slice_bytes)
    assert crc == crc32c(payload)
    assert bad == has_nonfinite_bytes(payload[: kv_el * el], wire)
    assert verify.scan_payload(payload, kv_el * el, wire, False, slice_bytes) == (crc, False)


SPECIAL_F32 = [0.0, -0.0, 1e-45, 3.4028235e38, float("inf"), float("-inf"), float("nan"), -1e-45, -2.0, 1.5]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_F32), st.floats(width=32)), max_size=40))
def test_scales_check_equals_the_float_test(values):
    arr = np.array(values, dtype="<f4")
    want = bool(np.isfinite(arr).all() and (arr >= 0).all())
    assert verify.scales_ok(memoryview(arr.tobytes())) is want


def _chunk(kv_dtype=KVDtype.BF16) -> bytearray:
    return bytearray(raw_frames(LAYOUT, kv_dtype=kv_dtype, chunk_bytes=1 << 20)[1])


def _payload_offset(frame: bytes) -> int:
    return PREFIX.size + PREFIX.unpack_from(frame, 0)[4]


@pytest.mark.parametrize("slice_bytes", [2, 64, 1 << 20])
def test_decode_checked_keeps_the_order_of_precedence(monkeypatch, slice_bytes):
    monkeypatch.setattr(verify, "VERIFY_SLICE_BYTES", slice_bytes)
    good = _chunk()
    assert isinstance(verify.decode_checked(bytes(good), 1 << 26), ChunkFrame)
    off = _payload_offset(good)
    c = decode_frame(bytes(good), payload_crc=False)
    k_len, v_len = c.lengths[0], c.lengths[1]
    nan_last_v = bytearray(good)  # a NaN in V's very last element, CRC recomputed: a value error
    nan_last_v[off + k_len + v_len - 2 : off + k_len + v_len] = (0x7FC0).to_bytes(2, "little")
    with pytest.raises(FrameError, match="NaN/Inf") as e:
        verify.decode_checked(_recrc(nan_last_v), 1 << 26)
    assert not isinstance(e.value, ChecksumError)
    with pytest.raises(ChecksumError):  # the same NaN without a new CRC: the checksum error wins
        verify.decode_checked(bytes(nan_last_v), 1 << 26)
    flipped = bytearray(good)
    flipped[off] ^= 1
    with pytest.raises(ChecksumError):
        verify.decode_checked(bytes(flipped), 1 << 26)
    with pytest.raises(ChecksumError):  # decode_frame alone still checks the CRC by default
        decode_frame(bytes(flipped))
    assert isinstance(decode_frame(bytes(flipped), payload_crc=False), ChunkFrame)  # the caller's job then


def _recrc(frame: bytearray) -> bytes:
    """Re-encode a CHUNK frame's header with the CRC32C of its (modified) payload."""
    import msgpack

    hlen = PREFIX.unpack_from(frame, 0)[4]
    header = msgpack.unpackb(bytes(frame[PREFIX.size : PREFIX.size + hlen]))
    payload = bytes(frame[PREFIX.size + hlen :])
    header["crc"] = crc32c(payload)
    hdr = msgpack.packb(header, use_bin_type=True)
    magic, version, kind, flags, _ = PREFIX.unpack_from(frame, 0)
    return PREFIX.pack(magic, version, kind, flags, len(hdr)) + hdr + payload


class _SlowSocket:
    """sendmsg writes at most `step` bytes per call (a congested connection)."""

    def __init__(self, step: int) -> None:
        self.step, self.out, self.calls = step, bytearray(), 0

    def sendmsg(self, views) -> int:
        self.calls += 1
        left = self.step
        for v in views:
            take = bytes(v[:left])
            self.out += take
            left -= len(take)
            if not left:
                break
        return self.step - left


@pytest.mark.parametrize("step", [1, 3, 1000, 1 << 20])
def test_send_parts_writes_every_byte_in_order_through_partial_writes(step):
    parts = [b"head", memoryview(np.arange(3000, dtype=np.uint8)), b"", memoryview(b"xyz")[1:], bytearray(b"tail")]
    s = _SlowSocket(step)
    send_parts(s, parts)  # type: ignore[arg-type]
    assert bytes(s.out) == b"".join(bytes(p) for p in parts)
    assert s.calls == -(-len(s.out) // step)
    a, b = socket.socketpair()  # a real socket: sendmsg's partial writes under a full buffer
    with a, b:
        big = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
        want = b"<" + big.tobytes() + b">"
        got = bytearray()

        def drain() -> None:
            while len(got) < len(want):
                got.extend(b.recv(1 << 20))

        t = threading.Thread(target=drain)
        t.start()
        send_parts(a, [b"<", memoryview(big), b">"])
        t.join(10)
        assert bytes(got) == want


class _SlowCopyingSink(FakeSink):
    """A sink that copies (as the contract asks) and is slow, so the data plane backs up."""

    def write_kv_layer(self, request_id, payload) -> None:
        time.sleep(0.003)
        with self.lock:
            if request_id not in self.reserved:
                raise KeyError(request_id)
            self.raw[request_id].append(None)  # keeps nothing of the received buffers


@pytest.mark.parametrize("stripes", [1, 2, 3])
def test_receive_buffers_stay_within_window_plus_one_and_are_all_freed(monkeypatch, stripes):
    """Every frame buffer is allocated after wait_room: at most window capacity + 1 (the frame being
    applied) are alive at once, the bound charged to max_inflight_bytes; all are freed at the end,
    failed frames' buffers included."""
    live, peak = set(), [0]
    real = dataplane._frame_buffer

    def counted(n):
        a = real(n)
        key = id(a)
        live.add(key)
        peak[0] = max(peak[0], len(live))
        weakref.finalize(a, live.discard, key)
        return a

    monkeypatch.setattr(dataplane, "_frame_buffer", counted)
    sink, rec = _SlowCopyingSink(LAYOUT), Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    try:
        with KVTransferClient(srv.address, auth_token=TOKEN, data_stripes=stripes) as cl:
            for rid, corrupt in (("ok", False), ("bad", True)):
                srv.reserve(rid, LAYOUT, N)
                st_ = cl.open_stream(rid, LAYOUT, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
                assert isinstance(st_, DataPlaneStream)
                payloads = make_payloads(LAYOUT, KVDtype.FP8_E4M3, N)
                if corrupt:  # a NaN in the last layer: that frame fails its checks
                    payloads[-1].k.view(torch.uint8)[0, 0, 0] = 0x7F
                try:
                    for p in payloads:
                        st_.send_layer(p)
                    st_.finish(1)
                except (FrameError, TransferCancelled):
                    assert corrupt
        wait_for(lambda: "ok" in rec.completed and "bad" in rec.failed)
        wait_for(lambda: srv._data.active() == 0)
    finally:
        srv.stop(0)
    assert 2 * stripes + 1 >= peak[0] > 1  # the default window: 2 frames per connection
    wait_for(lambda: not live, timeout_s=5)
    sink.release_kv("ok")
    sink.assert_no_leaks()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_fixed_data_port_is_used_advertised_and_a_busy_one_is_an_error():
    port = _free_port()
    sink, rec = FakeSink(LAYOUT), Recorder()
    srv = KVTransferServer(sink, rec.on_complete, auth_token=TOKEN, data_port=port)
    srv.start()
    try:
        assert srv.data_port == port
        with KVTransferClient(srv.address, auth_token=TOKEN) as cl:
            assert cl.health().data_port == port
            srv.reserve("r", LAYOUT, N)
            st_ = cl.open_stream("r", LAYOUT, KVDtype.BF16, PROMPT)
            assert isinstance(st_, DataPlaneStream)
            for p in make_payloads(LAYOUT, KVDtype.BF16, N):
                st_.send_layer(p)
            assert st_.finish(2).num_tokens == N
        busy = KVTransferServer(FakeSink(LAYOUT), rec.on_complete, auth_token=TOKEN, data_port=port)
        with pytest.raises(OSError, match=f"data plane to 127.0.0.1:{port}"):
            busy.start()
    finally:
        srv.stop(0)
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match="data_port"):
            KVTransferServer(FakeSink(LAYOUT), rec.on_complete, auth_token=TOKEN, data_port=bad)
    off = KVTransferServer(FakeSink(LAYOUT), rec.on_complete, auth_token=TOKEN, data_plane=False, data_port=port)
    off.start()
    try:
        assert off.data_port == 0  # data_port is ignored without a data plane
    finally:
        off.stop(0)
    sink.release_kv("r")
    sink.assert_no_leaks()


def _reply(sock: socket.socket):
    head = bytearray(REPLY_PREFIX.size)
    recv_exactly(sock, memoryview(head))
    body = bytearray(REPLY_PREFIX.unpack(head)[0])
    recv_exactly(sock, memoryview(body))
    return decode_reply_body(bytes(body))


def test_a_stripe_joining_after_the_transfer_failed_is_told_why():
    """Stripe 1 fails the transfer before stripe 0's hello is processed (threads race under load):
    stripe 0 must get the transfer's own error class, not a bare cancellation."""
    sink, rec = FakeSink(LAYOUT), Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    try:
        srv.reserve("r", LAYOUT, N)
        with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s1:
            s1.sendall(encode_hello(TOKEN, "r", "tid-late", 1, 2, 10_000) + ENVELOPE.pack(0, 1))
            first = _reply(s1)
        assert isinstance(first, FrameError) and "frame length" in str(first)
        wait_for(lambda: srv._data.active() == 0)
        with socket.create_connection(("127.0.0.1", srv.data_port), timeout=10) as s0:
            s0.sendall(encode_hello(TOKEN, "r", "tid-late", 0, 2, 10_000))
            late = _reply(s0)
        assert type(late) is FrameError and "already ended" in str(late) and "frame length" in str(late)
    finally:
        srv.stop(0)
    sink.assert_no_leaks()

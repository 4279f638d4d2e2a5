"""Golden bytes of each frame kind, compat-hash stability, mismatch messages, decoder rejections."""

from __future__ import annotations

import zlib

import msgpack
import pytest

from tests.wire.fakes import make_layout
from workers.kv_payload import KVLayoutMismatch
from workers.kv_transfer import control
from workers.kv_transfer.checksum import crc32c, crc32c_pure
from workers.kv_transfer.errors import ChecksumError, FrameError
from workers.kv_transfer.fp8 import WireDtype
from workers.kv_transfer.wire import (
    CHECKSUM_ALGORITHM,
    PREFIX,
    PROTOCOL_VERSION,
    ChunkFrame,
    FinishFrame,
    OpenFrame,
    decode_frame,
    encode_chunk,
    encode_finish,
    encode_open,
)

# Golden frames of protocol 3 (protocol 2's differ only in the version bytes 4-5: 0002). If one of
# these changes, the wire changed: bump PROTOCOL_VERSION, add a line to its history, update docs/wire-format.md, then these literals.
GOLDEN_FINISH = (
    "544b5646000303000000002885a3726964a57265712d31a373657103a566697273742aa76e6368756e6b7303a66e627974657364"
)
GOLDEN_CHUNK = (
    "544b564600030200000000548aa3726964a57265712d31a373657100a36c6179920102a3746f6b920002a26474a665346d33666e"
    "a57363616c65aa746f6b656e5f68656164a2627310a36c656e9408080808a3637263cea3a2b9cfa3656f70c3"
    "000102030405060708090a0b0c0d0e0f00000000000000000000000000000000"
)
GOLDEN_OPEN = (
    "544b564600030100000000718ba3726964a57265712d31a468617368d9206162616261626162616261626162616261626162"
    "616261626162616261626162a26474a462663136a57363616c65a46e6f6e65a46e746f6b02a46e6c617903a5686561647302"
    "a46864696d10a2627310a4706c656e08a3637263ce1b0b9920050000002c010000"
)
GOLDEN_HASH = "fbf2a77c6d54118555535af7915f903b"  # protocol 3 (2: 081ebcabd6a17c6874fc519e7d964f0a, 1: 19326c32…)


def _chunk() -> bytes:
    sections = [bytes(range(8)), bytes(range(8, 16)), bytes(8), bytes(8)]
    return encode_chunk("req-1", 0, 1, 0, 2, WireDtype.E4M3FN, sections, True, 16)


def test_protocol_version_is_3_with_crc32c():
    assert PROTOCOL_VERSION == 3
    assert CHECKSUM_ALGORITHM == "crc32c"


def test_crc32c_matches_the_rfc3720_check_value_and_the_pure_reference():
    assert crc32c(b"123456789") == crc32c_pure(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 41 + b"tail"
    assert crc32c(data) == crc32c_pure(data) != zlib.crc32(data)
    assert crc32c(data[1000:], crc32c(data[:1000])) == crc32c(data)  # sections chain without a join


def test_chunk_crc_field_is_crc32c_of_the_payload():
    raw = _chunk()
    c = decode_frame(raw)
    assert isinstance(c, ChunkFrame)
    payload = bytes(range(16)) + bytes(16)
    assert bytes(c.payload) == payload
    assert c.checksum == crc32c_pure(payload) != zlib.crc32(payload)


@pytest.mark.parametrize("old", [1, 2])
def test_older_protocol_frames_are_rejected(old):
    raw = bytearray(_chunk())
    raw[4:6] = old.to_bytes(2, "big")
    with pytest.raises(FrameError, match=f"protocol version {old} not supported"):
        decode_frame(bytes(raw))


def test_golden_bytes():
    assert encode_finish("req-1", 3, 42, 3, 100).hex() == GOLDEN_FINISH
    assert _chunk().hex() == GOLDEN_CHUNK
    assert encode_open("req-1", "ab" * 16, WireDtype.BF16, 2, 3, 2, 16, [5, 300], 16).hex() == GOLDEN_OPEN


def test_golden_frames_decode_to_their_fields():
    f = decode_frame(bytes.fromhex(GOLDEN_FINISH))
    assert f == FinishFrame("req-1", 3, 42, 3, 100)
    c = decode_frame(bytes.fromhex(GOLDEN_CHUNK))
    assert isinstance(c, ChunkFrame)
    assert (c.layer_start, c.token_start, c.token_end, c.lengths, c.end_of_payload) == (1, 0, 2, (8, 8, 8, 8), True)
    assert bytes(c.section(1)) == bytes(range(8, 16))
    o = decode_frame(bytes.fromhex(GOLDEN_OPEN))
    assert isinstance(o, OpenFrame)
    assert (o.prompt_token_ids, o.wire_dtype, o.num_layers, o.src_block_size) == ([5, 300], WireDtype.BF16, 3, 16)


def test_compat_hash_is_stable_and_covers_version_and_every_factor():
    lay = make_layout()
    assert lay.compat_hash(PROTOCOL_VERSION) == GOLDEN_HASH
    assert lay.compat_hash(PROTOCOL_VERSION + 1) != GOLDEN_HASH
    for change in [dict(model_fingerprint="other"), dict(num_layers=4), dict(num_kv_heads=4), dict(head_dim=32),
                   dict(rope_theta=500000.0), dict(rope_scaling=(("factor", 8.0),))]:
        assert make_layout(**change).compat_hash(PROTOCOL_VERSION) != GOLDEN_HASH, change


def test_layout_round_trips_through_the_handshake_body():
    lay = make_layout(rope_scaling=(("factor", 8.0), ("type", "llama3")))
    version, h, back = control.decode_handshake_request(control.encode_handshake_request(lay))
    assert (version, h, back) == (PROTOCOL_VERSION, lay.compat_hash(PROTOCOL_VERSION), lay)


def test_mismatch_message_names_each_factor():
    with pytest.raises(KVLayoutMismatch) as e:
        make_layout().check_compatible(make_layout(num_kv_heads=8, head_dim=64))
    assert "num_kv_heads: 2 here vs 8 at peer" in str(e.value)
    assert "head_dim: 16 here vs 64 at peer" in str(e.value)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b[:5], "truncated frame"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x00\x04" + b[6:], "protocol version 4"),
        (lambda b: b[:6] + b"\x09" + b[7:], "unknown frame kind"),
        (lambda b: b[:7] + b"\x01" + b[8:], "unknown flags"),
        (lambda b: b[:8] + b"\xff\xff\xff\xff" + b[12:], "header length"),
        (lambda b: b[:-1], "truncated?"),
        (lambda b: b + b"\x00", "truncated?"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    ],
)
def test_decoder_rejects_malformed_frames(mutate, needle):
    with pytest.raises(FrameError, match=None) as e:
        decode_frame(mutate(_chunk()))
    assert needle in str(e.value)


def test_checksum_flip_is_a_checksum_error():
    b = bytearray(_chunk())
    b[-20] ^= 0x10
    with pytest.raises(ChecksumError):
        decode_frame(bytes(b))


def _with_header(**changes) -> bytes:
    raw = _chunk()
    hlen = PREFIX.unpack_from(raw, 0)[4]
    header = msgpack.unpackb(raw[PREFIX.size : PREFIX.size + hlen])
    header.update(changes)
    hdr = msgpack.packb(header)
    return PREFIX.pack(b"TKVF", PROTOCOL_VERSION, 2, 0, len(hdr)) + hdr + raw[PREFIX.size + hlen :]


@pytest.mark.parametrize(
    "changes",
    [
        dict(lay=[1, 3]), dict(lay=[2, 1]), dict(lay=[-1, 0]), dict(tok=[0, 1 << 40]), dict(tok="x"),
        dict(len=[8, 8, 8]), dict(len=[8, 8, 8, -8]), dict(len=[1 << 60, 0, 0, 0]), dict(dt="e3m4"),
        dict(scale="none"), dict(eop=1), dict(seq=True), dict(rid=""), dict(rid="x" * 300), dict(crc=-1),
    ],
)
def test_decoder_validates_every_header_field(changes):
    with pytest.raises(FrameError):
        decode_frame(_with_header(**changes))


def test_frame_size_cap():
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(_chunk(), max_frame_bytes=64)


def test_non_map_header_and_garbage_msgpack():
    for hdr in (msgpack.packb([1, 2]), b"\xc1", b"\xdd\xff\xff\xff\xff"):
        data = PREFIX.pack(b"TKVF", 1, 3, 0, len(hdr)) + hdr
        with pytest.raises(FrameError):
            decode_frame(data)


def test_handshake_reply_decoder_rejects_bad_layouts():
    good = msgpack.unpackb(control.encode_handshake_reply(True, make_layout()))
    for bad_layout in (None, {}, {**good["layout"], "num_layers": 0}, {**good["layout"], "rope_theta": "x"},
                       {**good["layout"], "rope_scaling": [["a"]]}):
        with pytest.raises(FrameError):
            control.decode_handshake_reply(msgpack.packb({**good, "layout": bad_layout}))

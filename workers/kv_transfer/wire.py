"""The KV data frames: layout of the bytes, encoders, and the validating decoder.

Every gRPC message of the `PushKV` stream is one frame (docs/wire-format.md is the reference):

    prefix  12 bytes  ">4sHBBI": magic b"TKVF", protocol version (u16), kind (u8), flags (u8, 0),
                      header length (u32)
    header  msgpack map (string keys), at most MAX_HEADER_BYTES
    payload raw bytes, the concatenation of the sections whose lengths the header lists

`decode_frame` trusts nothing: every size, count and offset is checked against the frame itself
before anything is sliced, and a chunk's payload against its CRC32C (`checksum.py`). Checks that need the
reservation (layer count, heads, token order) are the receiver's (`receiver.py`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from workers.kv_transfer.checksum import crc32c
from workers.kv_transfer.errors import ChecksumError, FrameError
from workers.kv_transfer.fp8 import WireDtype

# Protocol version history (bump on any change to frames, headers or the compat hash inputs):
#   1  2026-11-22  first version: OPEN / CHUNK / FINISH frames; one layer per chunk; crc32 (zlib)
#                  over each chunk's payload; per-(token, KV head) float32 scales.
#   2  2026-11-22  the `crc` fields (OPEN and CHUNK) are CRC32C (Castagnoli, RFC 3720) instead of
#                  zlib's crc32: hardware-accelerated (~10x faster here), stdlib crc32 was the
#                  throughput bound. Frames, headers and sections otherwise unchanged.
#   3  2026-11-22  a second data plane: the same frames may travel over raw TCP connections (one
#                  transfer striped over 1-16 of them) negotiated through the gRPC control RPCs
#                  (Health / Handshake replies carry `dport`); `dataplane_codec.py` holds the connection
#                  preamble, the length+position envelope and the reply. Frame bytes unchanged but
#                  for this version field. Reason: a gRPC stream costs ~2x the CPU per GB of KV.
PROTOCOL_VERSION = 3
CHECKSUM_ALGORITHM = "crc32c"  # what the `crc` header fields hold in this protocol version

MAGIC = b"TKVF"
PREFIX = struct.Struct(">4sHBBI")
MAX_HEADER_BYTES = 64 * 1024
MAX_REQUEST_ID_CHARS = 256
MAX_TOKENS = 1 << 22  # 4M tokens: far above any context, small enough to bound every allocation
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKEN_ID = (1 << 32) - 1
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameKind(enum.IntEnum):
    OPEN = 1  # starts a transfer: request id, layout hash, dtype, sizes; payload = prompt token ids
    CHUNK = 2  # one layer's token range of K, V (and scales)
    FINISH = 3  # ends a transfer: first sampled token, totals to cross-check


class ScaleLayout(enum.StrEnum):
    NONE = "none"  # bf16: no scales
    PER_TOKEN_HEAD = "token_head"  # float32 [tokens, kv_heads] for K and for V


@dataclass(frozen=True)
class OpenFrame:
    request_id: str
    compat_hash: str
    wire_dtype: WireDtype
    scale_layout: ScaleLayout
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    src_block_size: int
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class ChunkFrame:
    request_id: str
    seq: int
    layer_start: int
    layer_end: int  # exclusive; protocols 1-3 require layer_end == layer_start + 1
    token_start: int
    token_end: int  # exclusive
    wire_dtype: WireDtype
    scale_layout: ScaleLayout
    src_block_size: int
    lengths: tuple[int, int, int, int]  # bytes of k, v, k_scale, v_scale
    checksum: int
    end_of_payload: bool  # last chunk of the sender's KVLayerPayload: the receiver writes it then
    payload: memoryview

    def section(self, i: int) -> memoryview:
        off = sum(self.lengths[:i])
        return self.payload[off : off + self.lengths[i]]


@dataclass(frozen=True)
class FinishFrame:
    request_id: str
    seq: int
    first_token_id: int
    num_chunks: int
    payload_bytes: int


Frame = OpenFrame | ChunkFrame | FinishFrame


def _head(kind: FrameKind, header: dict[str, Any]) -> bytes:
    """Prefix + msgpack header of a frame (what precedes its payload sections)."""
    hdr = msgpack.packb(header, use_bin_type=True)
    if len(hdr) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(hdr)} bytes exceeds {MAX_HEADER_BYTES}")
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(kind), 0, len(hdr)) + hdr


def _pack(kind: FrameKind, header: dict[str, Any], payload: Sequence[memoryview | bytes] = ()) -> bytes:
    return b"".join([_head(kind, header), *payload])


def encode_open(
    request_id: str,
    compat_hash: str,
    wire_dtype: WireDtype,
    num_tokens: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    prompt_token_ids: Sequence[int],
    src_block_size: int = 0,
) -> bytes:
    """OPEN frame; the payload is the prompt's token ids as little-endian uint32."""
    ids = struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids)
    scale = ScaleLayout.PER_TOKEN_HEAD if wire_dtype.is_fp8 else ScaleLayout.NONE
    header = {
        "rid": request_id, "hash": compat_hash, "dt": wire_dtype.value, "scale": scale.value,
        "ntok": num_tokens, "nlay": num_layers, "heads": num_kv_heads, "hdim": head_dim,
        "bs": src_block_size, "plen": len(ids), "crc": crc32c(ids),
    }
    return _pack(FrameKind.OPEN, header, [ids])


def encode_chunk(
    request_id: str,
    seq: int,
    layer: int,
    token_start: int,
    token_end: int,
    wire_dtype: WireDtype,
    sections: Sequence[memoryview | bytes],
    end_of_payload: bool,
    src_block_size: int = 0,
) -> bytes:
    """CHUNK frame carrying sections [k, v, k_scale, v_scale] (scales empty for bf16)."""
    return b"".join(chunk_parts(request_id, seq, layer, token_start, token_end, wire_dtype, sections,
                                end_of_payload, src_block_size))


def chunk_parts(
    request_id: str,
    seq: int,
    layer: int,
    token_start: int,
    token_end: int,
    wire_dtype: WireDtype,
    sections: Sequence[memoryview | bytes],
    end_of_payload: bool,
    src_block_size: int = 0,
) -> list[memoryview | bytes]:
    """The CHUNK frame of `encode_chunk` as [prefix + header, *sections], not joined: the data
    plane writes the parts to its socket one after another (no copy of the payload on the sender)."""
    crc = 0
    for s in sections:
        crc = crc32c(s, crc)
    scale = ScaleLayout.PER_TOKEN_HEAD if wire_dtype.is_fp8 else ScaleLayout.NONE
    header = {
        "rid": request_id, "seq": seq, "lay": [layer, layer + 1], "tok": [token_start, token_end],
        "dt": wire_dtype.value, "scale": scale.value, "bs": src_block_size,
        "len": [len(memoryview(s).cast("B")) for s in sections], "crc": crc, "eop": end_of_payload,
    }
    return [_head(FrameKind.CHUNK, header), *sections]


def encode_finish(request_id: str, seq: int, first_token_id: int, num_chunks: int, payload_bytes: int) -> bytes:
    header = {"rid": request_id, "seq": seq, "first": first_token_id, "nchunks": num_chunks, "nbytes": payload_bytes}
    return _pack(FrameKind.FINISH, header)


# ---------------------------------------------------------------- decoding (peer input: validate all)


def unpack_map(data: bytes | memoryview, what: str, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a bounded msgpack map with string keys, or raise FrameError."""
    if len(data) > max_bytes:
        raise FrameError(f"{what}: {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_bytes, max_bin_len=0, max_array_len=4096, max_map_len=64, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"{what}: not a valid msgpack map ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise FrameError(f"{what}: expected a msgpack map, got {type(obj).__name__}")
    return obj


def get_int(h: dict[str, Any], key: str, lo: int, hi: int, what: str = "header") -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FrameError(f"{what}: field {key!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise FrameError(f"{what}: field {key!r}={v} outside [{lo}, {hi}]")
    return v


def get_str(h: dict[str, Any], key: str, max_chars: int, what: str = "header") -> str:
    v = h.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_chars:
        raise FrameError(f"{what}: field {key!r} must be a non-empty string of at most {max_chars} chars")
    return v


def _get_range(h: dict[str, Any], key: str, hi: int) -> tuple[int, int]:
    v = h.get(key)
    if not isinstance(v, list) or len(v) != 2:
        raise FrameError(f"header: field {key!r} must be a [start, end] pair")
    a, b = v
    for x in (a, b):
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= hi:
            raise FrameError(f"header: field {key!r}={v!r} out of range [0, {hi}]")
    if a >= b:
        raise FrameError(f"header: field {key!r}={v!r} is empty or reversed")
    return a, b


def _get_enum(h: dict[str, Any], key: str, enum_cls: type[enum.Enum]) -> Any:
    v = h.get(key)
    try:
        return enum_cls(v)
    except (ValueError, TypeError):
        allowed = ", ".join(str(m.value) for m in enum_cls)
        raise FrameError(f"header: field {key!r}={v!r} is not one of {allowed}") from None


def decode_frame(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, payload_crc: bool = True) -> Frame:
    """Parse and validate one frame; raises FrameError (ChecksumError for a corrupt payload).

    payload_crc=False leaves a CHUNK's payload CRC32C to the caller, who must check it before using
    the frame: only `verify.decode_checked` does, fusing it with the value checks in one pass."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    n = len(data)
    if n > max_frame_bytes:
        raise FrameError(f"frame of {n} bytes exceeds the limit of {max_frame_bytes}")
    if n < PREFIX.size:
        raise FrameError(f"truncated frame: {n} bytes, the prefix alone is {PREFIX.size}")
    magic, version, kind_raw, flags, hlen = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})")
    if flags != 0:
        raise FrameError(f"unknown flags {flags:#x}")
    try:
        kind = FrameKind(kind_raw)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind_raw}") from None
    if hlen > MAX_HEADER_BYTES or PREFIX.size + hlen > n:
        raise FrameError(f"header length {hlen} does not fit in a frame of {n} bytes")
    view = memoryview(data)
    h = unpack_map(view[PREFIX.size : PREFIX.size + hlen], "header")
    payload = view[PREFIX.size + hlen :]
    rid = get_str(h, "rid", MAX_REQUEST_ID_CHARS)
    if kind is FrameKind.OPEN:
        return _decode_open(h, rid, payload)
    if kind is FrameKind.CHUNK:
        return _decode_chunk(h, rid, payload, payload_crc)
    if len(payload):
        raise FrameError(f"finish frame carries {len(payload)} unexpected payload bytes")
    return FinishFrame(
        request_id=rid,
        seq=get_int(h, "seq", 0, 1 << 40),
        first_token_id=get_int(h, "first", 0, MAX_TOKEN_ID),
        num_chunks=get_int(h, "nchunks", 0, 1 << 40),
        payload_bytes=get_int(h, "nbytes", 0, 1 << 50),
    )


def _decode_open(h: dict[str, Any], rid: str, payload: memoryview) -> OpenFrame:
    ntok = get_int(h, "ntok", 1, MAX_TOKENS)
    plen = get_int(h, "plen", 0, 4 * MAX_TOKENS)
    if plen != len(payload) or plen != 4 * ntok:
        raise FrameError(f"open frame: {len(payload)} payload bytes, header says {plen}, {ntok} tokens need {4 * ntok}")
    if crc32c(payload) != get_int(h, "crc", 0, 0xFFFFFFFF):
        raise ChecksumError(f"open frame of {rid!r}: prompt token ids fail their checksum")
    wire = _get_enum(h, "dt", WireDtype)
    scale = _get_enum(h, "scale", ScaleLayout)
    _check_scale_layout(wire, scale)
    return OpenFrame(
        request_id=rid,
        compat_hash=get_str(h, "hash", 128),
        wire_dtype=wire,
        scale_layout=scale,
        num_tokens=ntok,
        num_layers=get_int(h, "nlay", 1, MAX_LAYERS),
        num_kv_heads=get_int(h, "heads", 1, MAX_HEADS),
        head_dim=get_int(h, "hdim", 1, MAX_HEAD_DIM),
        src_block_size=get_int(h, "bs", 0, 1 << 20),
        prompt_token_ids=list(struct.unpack(f"<{ntok}I", payload)),
    )


def _check_scale_layout(wire: WireDtype, scale: ScaleLayout) -> None:
    expected = ScaleLayout.PER_TOKEN_HEAD if wire.is_fp8 else ScaleLayout.NONE
    if scale is not expected:
        raise FrameError(f"header: scale layout {scale.value!r} is invalid for {wire.value} (expected {expected.value!r})")


def _decode_chunk(h: dict[str, Any], rid: str, payload: memoryview, payload_crc: bool = True) -> ChunkFrame:
    layer_start, layer_end = _get_range(h, "lay", MAX_LAYERS)
    if layer_end != layer_start + 1:
        raise FrameError(f"chunk: layer range [{layer_start}, {layer_end}) must hold exactly one layer in protocol {PROTOCOL_VERSION}")
    token_start, token_end = _get_range(h, "tok", MAX_TOKENS)
    wire = _get_enum(h, "dt", WireDtype)
    scale = _get_enum(h, "scale", ScaleLayout)
    _check_scale_layout(wire, scale)
    lens = h.get("len")
    if (
        not isinstance(lens, list)
        or len(lens) != 4
        or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in lens)
    ):
        raise FrameError("chunk: field 'len' must be four non-negative integers [k, v, k_scale, v_scale]")
    if sum(lens) != len(payload):
        raise FrameError(f"chunk: sections sum to {sum(lens)} bytes but the payload holds {len(payload)} (truncated?)")
    eop = h.get("eop")
    if not isinstance(eop, bool):
        raise FrameError("chunk: field 'eop' must be a boolean")
    crc = get_int(h, "crc", 0, 0xFFFFFFFF)
    if payload_crc and crc32c(payload) != crc:
        raise ChecksumError(f"chunk of {rid!r} layer {layer_start} tokens [{token_start}, {token_end}): checksum mismatch")
    return ChunkFrame(
        request_id=rid,
        seq=get_int(h, "seq", 0, 1 << 40),
        layer_start=layer_start,
        layer_end=layer_end,
        token_start=token_start,
        token_end=token_end,
        wire_dtype=wire,
        scale_layout=scale,
        src_block_size=get_int(h, "bs", 0, 1 << 20),
        lengths=(lens[0], lens[1], lens[2], lens[3]),
        checksum=crc,
        end_of_payload=eop,
        payload=payload,
    )

"""Bodies of the control RPCs (Handshake, Cancel, Health) and of PushKV's acknowledgement.

Each body is one msgpack map (never pickle). Decoders validate every field: these are peer input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from workers.kv_payload import KVLayout
from workers.kv_transfer.errors import FrameError
from workers.kv_transfer.fp8 import WireDtype
from workers.kv_transfer.wire import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_REQUEST_ID_CHARS,
    MAX_TOKENS,
    PROTOCOL_VERSION,
    get_int,
    get_str,
    unpack_map,
)


def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


# ---------------------------------------------------------------- layout


def layout_from_dict(d: Any) -> KVLayout:
    """Rebuild a KVLayout from its `as_dict()` form sent by the peer; FrameError when malformed."""
    if not isinstance(d, dict):
        raise FrameError("layout must be a map")
    theta = d.get("rope_theta")
    if not isinstance(theta, int | float) or isinstance(theta, bool) or not math.isfinite(theta):
        raise FrameError("layout: rope_theta must be a finite number")
    scaling = d.get("rope_scaling")
    if not isinstance(scaling, list) or len(scaling) > 32:
        raise FrameError("layout: rope_scaling must be a list of at most 32 [key, value] pairs")
    pairs = []
    for kv in scaling:
        if (
            not isinstance(kv, list)
            or len(kv) != 2
            or not isinstance(kv[0], str)
            or not isinstance(kv[1], str | int | float | bool | None)
        ):
            raise FrameError("layout: each rope_scaling entry must be [str, scalar]")
        pairs.append((kv[0], kv[1]))
    return KVLayout(
        model_fingerprint=get_str(d, "model_fingerprint", 256, "layout"),
        num_layers=get_int(d, "num_layers", 1, MAX_LAYERS, "layout"),
        num_kv_heads=get_int(d, "num_kv_heads", 1, MAX_HEADS, "layout"),
        head_dim=get_int(d, "head_dim", 1, MAX_HEAD_DIM, "layout"),
        rope_theta=float(theta),
        rope_scaling=tuple(pairs),
    )


# ---------------------------------------------------------------- handshake


def encode_handshake_request(layout: KVLayout) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "hash": layout.compat_hash(PROTOCOL_VERSION), "layout": layout.as_dict()})


def decode_handshake_request(data: bytes) -> tuple[int, str, KVLayout]:
    h = unpack_map(data, "handshake request")
    version = get_int(h, "v", 0, 65535, "handshake request")
    return version, get_str(h, "hash", 128, "handshake request"), layout_from_dict(h.get("layout"))


@dataclass(frozen=True)
class HandshakeReply:
    ok: bool
    protocol_version: int
    compat_hash: str
    layout: KVLayout
    accepted_dtypes: tuple[WireDtype, ...]
    data_port: int = 0  # protocol 3: TCP port of the receiver's raw data plane, 0 when it has none


def encode_handshake_reply(ok: bool, layout: KVLayout, data_port: int = 0) -> bytes:
    return pack({
        "v": PROTOCOL_VERSION, "ok": ok, "hash": layout.compat_hash(PROTOCOL_VERSION),
        "layout": layout.as_dict(), "dtypes": [d.value for d in WireDtype], "dport": int(data_port),
    })


def _data_port(h: dict[str, Any], what: str) -> int:
    """`dport` (protocol 3); absent means no data plane."""
    return get_int(h, "dport", 0, 65535, what) if "dport" in h else 0


def decode_handshake_reply(data: bytes) -> HandshakeReply:
    h = unpack_map(data, "handshake reply")
    ok = h.get("ok")
    if not isinstance(ok, bool):
        raise FrameError("handshake reply: 'ok' must be a boolean")
    dtypes = h.get("dtypes")
    if not isinstance(dtypes, list) or len(dtypes) > 16:
        raise FrameError("handshake reply: 'dtypes' must be a short list")
    accepted = tuple(WireDtype(d) for d in dtypes if d in {w.value for w in WireDtype})
    return HandshakeReply(
        ok=ok,
        protocol_version=get_int(h, "v", 0, 65535, "handshake reply"),
        compat_hash=get_str(h, "hash", 128, "handshake reply"),
        layout=layout_from_dict(h.get("layout")),
        accepted_dtypes=accepted,
        data_port=_data_port(h, "handshake reply"),
    )


# ---------------------------------------------------------------- cancel / health


def encode_cancel(request_id: str) -> bytes:
    return pack({"rid": request_id})


def decode_cancel(data: bytes) -> str:
    return get_str(unpack_map(data, "cancel request"), "rid", MAX_REQUEST_ID_CHARS, "cancel request")


@dataclass(frozen=True)
class Health:
    ok: bool
    protocol_version: int
    active_transfers: int
    reservations: int
    data_port: int = 0  # protocol 3: TCP port of the receiver's raw data plane, 0 when it has none


def encode_health(active: int, reservations: int, data_port: int = 0) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "ok": True, "active": active, "reserved": reservations,
                 "dport": int(data_port)})


def decode_health(data: bytes) -> Health:
    h = unpack_map(data, "health reply")
    ok = h.get("ok")
    if not isinstance(ok, bool):
        raise FrameError("health reply: 'ok' must be a boolean")
    return Health(
        ok=ok,
        protocol_version=get_int(h, "v", 0, 65535, "health reply"),
        active_transfers=get_int(h, "active", 0, 1 << 31, "health reply"),
        reservations=get_int(h, "reserved", 0, 1 << 31, "health reply"),
        data_port=_data_port(h, "health reply"),
    )


# ---------------------------------------------------------------- acknowledgement


@dataclass(frozen=True)
class TransferAck:
    """The receiver's answer to a finished stream: what it verified and wrote."""

    request_id: str
    num_tokens: int
    num_chunks: int
    bytes_received: int
    wire_dtype: WireDtype
    receive_ms: float  # OPEN frame to last layer written


def encode_ack(ack: TransferAck) -> bytes:
    return pack({
        "rid": ack.request_id, "ntok": ack.num_tokens, "chunks": ack.num_chunks,
        "bytes": ack.bytes_received, "dt": ack.wire_dtype.value, "ms": float(ack.receive_ms),
    })


def decode_ack(data: bytes) -> TransferAck:
    h = unpack_map(data, "ack")
    ms = h.get("ms")
    if not isinstance(ms, float) or not math.isfinite(ms):
        raise FrameError("ack: 'ms' must be a finite float")
    try:
        dt = WireDtype(h.get("dt"))
    except ValueError:
        raise FrameError("ack: unknown dtype") from None
    return TransferAck(
        request_id=get_str(h, "rid", MAX_REQUEST_ID_CHARS, "ack"),
        num_tokens=get_int(h, "ntok", 1, MAX_TOKENS, "ack"),
        num_chunks=get_int(h, "chunks", 0, 1 << 40, "ack"),
        bytes_received=get_int(h, "bytes", 0, 1 << 50, "ack"),
        wire_dtype=dt,
        receive_ms=ms,
    )

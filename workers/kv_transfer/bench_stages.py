"""Per-stage measurements for `tandem bench kv-transfer` (workers/kv_transfer/bench.py).

Where the time of a KV transfer goes, each piece alone: the gRPC transport with no per-byte work
(`bare_server` + `bare_grpc_once`: the same frame sizes as the real path, prebuilt), the sender's
framing and the receiver's verification (`stage_rates`, in-process, one thread), and CPU seconds
per GB moved on each end (`cpu_s`, `self_cpu_s`), which swings far less than GB/s on a shared box.
"""

from __future__ import annotations

import os
import statistics
import struct
import time
from typing import Any

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVLayerPayload, KVLayout


def self_cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    t = os.times()
    return t.user + t.system


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_server() -> tuple[Any, int]:
    """A raw-bytes gRPC PushKV look-alike that only counts bytes: the transport's own ceiling."""
    from concurrent import futures

    import grpc

    from workers.kv_transfer.server import channel_options
    from workers.kv_transfer.wire import DEFAULT_MAX_FRAME_BYTES, MAX_HEADER_BYTES

    def push(request_iterator, context) -> bytes:
        return struct.pack(">Q", sum(len(m) for m in request_iterator))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=channel_options(DEFAULT_MAX_FRAME_BYTES + MAX_HEADER_BYTES))
    handler = grpc.method_handlers_generic_handler("bench.Bare", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def bare_grpc_once(channel, frames: list[bytes], num_layers: int) -> float:
    """Seconds to stream num_layers x `frames` (prebuilt, constant) to the bare server: gRPC alone."""
    push = channel.stream_unary("/bench.Bare/Push")
    t0 = time.perf_counter()
    n = struct.unpack(">Q", push(f for _ in range(num_layers) for f in frames))[0]
    dt = time.perf_counter() - t0
    if n != num_layers * sum(map(len, frames)):
        raise RuntimeError(f"bare gRPC moved {n} bytes")
    return dt


def stage_rates(layout: KVLayout, payload: KVLayerPayload, kv_dtype: KVDtype, num_tokens: int,
                chunk_bytes: int, layers: int = 4, repeat: int = 3) -> dict[str, float]:
    """GB/s of each per-byte stage alone, in this process, one thread (medians of `repeat` passes,
    with and without value checks alternating): framing on the sender (CRC32C + header + one join
    per frame) and the receiver's Session.feed (decode, CRC32C, checks, null sink) on each frame
    right after a copy of it (as gRPC hands the receiver a fresh bytes)."""
    runs: dict[str, list[float]] = {"frame_gbps": [], "receive_gbps": [], "receive_no_value_checks_gbps": []}
    for _ in range(repeat):
        for check in (True, False):
            frame_gbps, feed_gbps = _stage_pass(layout, payload, kv_dtype, num_tokens, chunk_bytes, layers, check)
            runs["frame_gbps"].append(frame_gbps)
            runs["receive_gbps" if check else "receive_no_value_checks_gbps"].append(feed_gbps)
    return {k: statistics.median(v) for k, v in runs.items()}


def _stage_pass(layout: KVLayout, payload: KVLayerPayload, kv_dtype: KVDtype, num_tokens: int,
                chunk_bytes: int, layers: int, check: bool) -> tuple[float, float]:
    from workers.kv_transfer.bench import _NullSink
    from workers.kv_transfer.fp8 import wire_dtype_of
    from workers.kv_transfer.receiver import KVReceiver
    from workers.kv_transfer.sender import iter_frames
    from workers.kv_transfer.wire import PROTOCOL_VERSION, encode_open

    wire = wire_dtype_of(kv_dtype)
    rec = KVReceiver(_NullSink(layout, kv_dtype), lambda rid, s: None, check_values=check)
    rec.reserve("stage", layout, num_tokens, lease_s=600)
    sess = rec.begin()
    sess.feed(encode_open("stage", layout.compat_hash(PROTOCOL_VERSION), wire, num_tokens, layout.num_layers,
                          layout.num_kv_heads, layout.head_dim, [1] * num_tokens))
    seq, nbytes, frame_s, feed_s = 0, 0, 0.0, 0.0
    for layer in range(min(layers, layout.num_layers)):
        p = KVLayerPayload(layer, 0, payload.k, payload.v, payload.k_scale, payload.v_scale)
        frames = iter_frames("stage", p, wire, seq, chunk_bytes)
        while True:
            t0 = time.perf_counter()
            f = next(frames, None)
            t1 = time.perf_counter()
            if f is None:
                break
            frame_s += t1 - t0
            received = bytes(bytearray(f))  # what the receiver holds: a fresh copy
            t2 = time.perf_counter()
            sess.feed(received)
            feed_s += time.perf_counter() - t2
            nbytes += len(f)
            seq += 1
    rec.close()
    return nbytes / frame_s / 1e9, nbytes / feed_s / 1e9

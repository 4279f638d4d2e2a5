"""`tandem bench kv-transfer`: KV transfer throughput over loopback gRPC vs a raw TCP socket.

For each (prompt length, KV dtype) it moves one prompt's KV of a model shape (synthetic tensors,
`orchestrator/core/model_shape.py`) through a real KVTransferServer on 127.0.0.1 (frames, CRC32C,
validation, assembly; the sink discards) over each requested transport (`--transport`: `data` = the
raw-TCP data plane striped over each of `--stripes` connection counts, `grpc` = a gRPC PushKV stream)
and, interleaved in the same run, the same payload bytes through a plain TCP socket (sendall /
recv_into, nothing else): the ceiling. `kv_over_raw` is the ratio of medians; `kv_over_raw_paired` the
median of each repeat's own ratio (raw and KV run back to back, so a load swing hits both). It prints GB/s of both, their
ratio, bytes of bf16 vs fp8, and how much of the transfer layer-wise streaming hides behind a
simulated per-layer prefill compute delay (stream while "computing" vs send after prefill). Where
the time goes (`bench_stages.py`): the same frames through a bare raw-bytes gRPC stream, the framing
and verification rates alone, and CPU seconds per GB on each end of each transport.

    tandem bench kv-transfer --model-shape llama-3.1-8b-shape --tokens 1024,8192 --kv-dtype bf16,fp8_e4m3 \
        --transport data,grpc --stripes 1,2 --streams 1 --out benchmarks/kv_transfer.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.core.model_shape import ModelShape, get_shape
from orchestrator.core.types import KVDtype
from workers.kv_payload import KVLayerPayload, KVLayout
from workers.kv_transfer.bench_report import format_table
from workers.kv_transfer.bench_stages import bare_grpc_once, bare_server, cpu_s, self_cpu_s, stage_rates

# torch and grpc are imported inside functions: the raw-socket receiver process needs neither.

BENCH_TOKEN = "bench-token-loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["kv-transfer"], help="which benchmark")
    parser.add_argument("--model-shape", default="llama-3.1-8b-shape")
    parser.add_argument("--tokens", default="1024,8192", help="comma-separated prompt lengths")
    parser.add_argument("--kv-dtype", default="bf16,fp8_e4m3", help="comma-separated: bf16, fp8_e4m3, fp8_e5m2")
    parser.add_argument("--streams", type=int, default=1, help="concurrent transfers (each a whole prompt)")
    parser.add_argument("--transport", default="data",
                        help="comma-separated: data (raw-TCP data plane), grpc (gRPC PushKV stream)")
    parser.add_argument("--stripes", default=None,
                        help="comma-separated connection counts of the data plane (default: the client's default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point; the median is reported")
    parser.add_argument("--chunk-mib", type=float, default=None,
                        help="payload MiB per frame (default: each transport's own, data plane 8, gRPC 2)")
    parser.add_argument("--layer-compute-ms", type=float, default=None,
                        help="simulated prefill compute per layer for the overlap measurement "
                             "(default: the time one layer takes to transfer, i.e. compute and transfer balanced)")
    parser.add_argument("--no-overlap", action="store_true", help="skip the streaming-overlap measurement")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here (e.g. benchmarks/…)")


class _NullSink:
    """A KVSink that accepts and drops every layer (the receiver's own work is what is measured)."""

    def __init__(self, layout: KVLayout, kv_dtype: KVDtype) -> None:
        self._layout, self._dtype = layout, kv_dtype

    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_dtype(self) -> KVDtype:
        return self._dtype

    def reserve_kv(self, request_id: str, layout: KVLayout, num_tokens: int) -> None:
        self._layout.check_compatible(layout)

    def write_kv_layer(self, request_id: str, payload: KVLayerPayload) -> None:
        pass

    def release_kv(self, request_id: str) -> None:
        pass


def layout_of(shape: ModelShape) -> KVLayout:
    return KVLayout(f"bench:{shape.name}", shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.rope_theta)


def synthetic_layer(shape: ModelShape, num_tokens: int, kv_dtype: KVDtype, seed: int = 0) -> KVLayerPayload:
    """One layer of K/V for num_tokens (reused for every layer: the bytes moved are the same size)."""
    import torch

    from workers.kv_transfer.fp8 import quantize, wire_dtype_of

    g = torch.Generator().manual_seed(seed)
    dims = (num_tokens, shape.num_kv_heads, shape.head_dim)
    wire = wire_dtype_of(kv_dtype)
    k, ks = quantize(torch.randn(dims, generator=g), wire)
    v, vs = quantize(torch.randn(dims, generator=g), wire)
    return KVLayerPayload(layer=0, token_start=0, k=k, v=v, k_scale=ks, v_scale=vs)


def _sections(p: KVLayerPayload) -> list[memoryview]:
    import torch

    out = []
    for t in (p.k, p.v, p.k_scale, p.v_scale):
        if t is not None:
            out.append(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
    return out


# ---------------------------------------------------------------- receivers in a child process
# The receiving side runs in its own process, as a decode worker would: sender and receiver do
# not share a GIL. The child reads commands on stdin ("R rid num_tokens" -> reserve) and prints
# its port first, then "ok" per command.


def _raw_receiver(lsock: socket.socket) -> None:
    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the data plane's sockets
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) != 8:
                return
            need = struct.unpack(">Q", head)[0]
            buf = bytearray(4 << 20)
            view = memoryview(buf)
            while need:
                n = conn.recv_into(view, min(len(buf), need))
                if n == 0:
                    return
                need -= n
            conn.sendall(b"k")

    while True:
        conn, _addr = lsock.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def _child_main() -> None:
    """Entry of a receiver process: argv = [kind, shape, comma-separated kv dtypes]."""
    kind, shape_name, dtypes = sys.argv[1:4]
    if kind == "raw":
        lsock = socket.create_server(("127.0.0.1", 0))
        print(lsock.getsockname()[1], flush=True)
        threading.Thread(target=_raw_receiver, args=(lsock,), daemon=True).start()
        sys.stdin.read()
        return
    from workers.kv_transfer.server import KVTransferServer

    bare = bare_server()
    layout = layout_of(get_shape(shape_name))
    servers = {}
    for d in dtypes.split(","):  # one server per KV dtype: the sink stores what is sent, no transcoding
        servers[d] = KVTransferServer(_NullSink(layout, KVDtype(d)), lambda rid, s: None, auth_token=BENCH_TOKEN,
                                      max_inflight_bytes=1 << 40, max_workers=16)
    print(" ".join([f"{d}={srv.start()}" for d, srv in servers.items()] + [f"bare={bare[1]}"]), flush=True)
    for line in sys.stdin:
        _cmd, d, rid, ntok = line.split()
        servers[d].reserve(rid, layout, int(ntok), lease_s=600)
        print("ok", flush=True)
    for srv in servers.values():
        srv.stop(0)
    bare[0].stop(0)


class _Child:
    """A receiver process; `ports` maps each kv dtype to its server's port (raw: one port for all)."""

    def __init__(self, kind: str, shape_name: str, kv_dtypes: list[KVDtype]) -> None:
        code = "from workers.kv_transfer.bench import _child_main; _child_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, kind, shape_name, ",".join(d.value for d in kv_dtypes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )
        line = self.proc.stdout.readline().split()
        if kind == "raw":
            self.ports = {d: int(line[0]) for d in kv_dtypes}
        else:
            pairs = dict(item.split("=") for item in line)
            self.bare_port = int(pairs.pop("bare"))
            self.ports = {KVDtype(k): int(v) for k, v in pairs.items()}
        self.lock = threading.Lock()

    def reserver(self, kv_dtype: KVDtype) -> _Reserver:
        return _Reserver(self, kv_dtype)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class _Reserver:
    """Stands in for KVTransferServer.reserve (a local call in the decode worker) across the process."""

    def __init__(self, child: _Child, kv_dtype: KVDtype) -> None:
        self.child, self.kv_dtype = child, kv_dtype

    def reserve(self, rid: str, layout: KVLayout, num_tokens: int, lease_s: float = 600) -> None:
        c = self.child
        with c.lock:
            c.proc.stdin.write(f"R {self.kv_dtype.value} {rid} {num_tokens}\n")
            c.proc.stdin.flush()
            if c.proc.stdout.readline().strip() != "ok":
                raise RuntimeError("bench receiver failed to reserve")


def _raw_tcp_once(port: int, sections: list[memoryview], num_layers: int, streams: int, conns: int = 1) -> float:
    """Seconds to push num_layers x sections over `streams` loopback sockets, receiver acks at the end.
    conns > 1 (one stream): the layers are dealt round-robin over that many sockets, as the data plane
    stripes one transfer, so a striped KV transfer is compared with a raw transfer of as many sockets."""

    def send_one(layers: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the data plane's sockets
            s.sendall(struct.pack(">Q", layers * sum(len(x) for x in sections)))
            for _ in range(layers):
                for sec in sections:
                    s.sendall(sec)
            if s.recv(1) != b"k":
                raise ConnectionError("raw socket: no ack")

    shares = [num_layers] * streams if conns <= 1 else [len(range(k, num_layers, conns)) for k in range(conns)]
    t0 = time.perf_counter()
    senders = [threading.Thread(target=send_one, args=(n,)) for n in shares]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- gRPC


def _grpc_once(server, client, layout: KVLayout, payload: KVLayerPayload, kv_dtype: KVDtype, num_tokens: int,
               streams: int, chunk_bytes: int, run_id: str, compute_s: float = 0.0, stream_layers: bool = True
               ) -> tuple[float, int]:
    """Seconds for `streams` concurrent transfers of one prompt's KV; returns (seconds, payload bytes)."""
    prompt = [1] * num_tokens
    errors: list[BaseException] = []
    moved = [0] * streams
    for i in range(streams):
        server.reserve(f"{run_id}-{i}", layout, num_tokens, lease_s=600)

    def one(i: int) -> None:
        rid = f"{run_id}-{i}"
        try:
            st = client.open_stream(rid, layout, kv_dtype, prompt, chunk_bytes=chunk_bytes, deadline_s=600)
            if not stream_layers and compute_s:
                time.sleep(compute_s * layout.num_layers)  # the whole prefill, then send
            for layer in range(layout.num_layers):
                if stream_layers and compute_s:
                    time.sleep(compute_s)  # this layer's compute, then send it while the next one runs
                st.send_layer(KVLayerPayload(layer, 0, payload.k, payload.v, payload.k_scale, payload.v_scale))
            moved[i] = st.finish(first_token_id=1).bytes_received
        except BaseException as e:  # reported after the join
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt, sum(moved)


def _malloc_tuned() -> bool:
    from workers.kv_transfer.memory import tune_malloc_for_streaming

    return tune_malloc_for_streaming()  # already applied by the client and the servers: reports it


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import grpc
    import msgpack
    import torch

    from workers.kv_transfer.checksum import BACKEND
    from workers.kv_transfer.wire import CHECKSUM_ALGORITHM, PROTOCOL_VERSION

    try:
        crc_version = version("crc32c")
    except PackageNotFoundError:
        crc_version = "not installed"
    return {
        "python": platform.python_version(), "torch": torch.__version__, "grpcio": grpc.__version__,
        "msgpack": ".".join(map(str, msgpack.version)), "numpy": __import__("numpy").__version__,
        "crc32c": crc_version, "checksum": f"{CHECKSUM_ALGORITHM} via {BACKEND}",
        "protocol_version": str(PROTOCOL_VERSION),
    }


def transport_label(data_stripes: int) -> str:
    """"grpc" for a gRPC PushKV stream (data_stripes 0), "data/N" for the data plane over N connections."""
    return "grpc" if data_stripes == 0 else f"data/{data_stripes}"


def run_bench(shape_name: str, tokens: list[int], dtypes: list[KVDtype], streams: int = 1, repeat: int = 3,
              chunk_bytes: int | None = None, layer_compute_ms: float | None = None, overlap: bool = True,
              transports: list[int] | None = None) -> dict[str, Any]:
    """Run every point; returns the JSON-able result (rows plus environment).

    transports: data-plane connection counts to measure, 0 meaning a gRPC PushKV stream; default
    [the client's default stripes]. One row per (tokens, dtype, transport), all interleaved with the
    same raw-TCP and bare-gRPC runs."""
    import grpc

    from workers.kv_transfer.client import DEFAULT_DATA_STRIPES, KVTransferClient
    from workers.kv_transfer.server import channel_options
    from workers.kv_transfer.wire import DEFAULT_MAX_FRAME_BYTES, MAX_HEADER_BYTES

    transports = transports or [DEFAULT_DATA_STRIPES]
    shape = get_shape(shape_name)
    layout = layout_of(shape)
    rows = []
    children = _Child("grpc", shape.name, dtypes), _Child("raw", shape.name, dtypes)
    pids = (children[0].proc.pid, children[1].proc.pid)
    try:
        for kv_dtype in dtypes:
            server = children[0].reserver(kv_dtype)
            raw_port = children[1].ports[kv_dtype]
            target = f"127.0.0.1:{children[0].ports[kv_dtype]}"
            clients = {t: KVTransferClient(target, auth_token=BENCH_TOKEN, timeout_s=60, data_plane=t > 0,
                                           data_stripes=max(t, 1)) for t in transports}
            for t, c in clients.items():
                if t > 0 and c.data_address() is None:
                    raise RuntimeError("the bench receiver offers no data plane")
            bare = grpc.insecure_channel(f"127.0.0.1:{children[0].bare_port}",
                                         options=channel_options(DEFAULT_MAX_FRAME_BYTES + MAX_HEADER_BYTES))
            try:
                for n in tokens:
                    rows.extend(_point(server, clients, raw_port, bare, pids, shape, layout, kv_dtype, n, streams,
                                       repeat, chunk_bytes, layer_compute_ms, overlap))
            finally:
                for c in clients.values():
                    c.close()
                bare.close()
    finally:
        for c in children:
            c.close()
    return {
        "benchmark": "kv-transfer", "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), loopback 127.0.0.1, "
                  "receiver in a child process",
        "versions": _versions(), "chunk_bytes": chunk_bytes, "repeat": repeat, "rows": rows,
        "malloc_tuned": _malloc_tuned(), "load_average": list(os.getloadavg()),
    }


def _point(server, clients, raw_port, bare_channel, pids, shape, layout, kv_dtype, n, streams, repeat, chunk_bytes,
           layer_compute_ms, overlap) -> list[dict[str, Any]]:
    """One (tokens, dtype) point, a row per transport; pids = (gRPC receiver process, raw receiver
    process) for CPU accounting."""
    from workers.kv_transfer.client import DEFAULT_DATA_CHUNK_BYTES
    from workers.kv_transfer.fp8 import wire_dtype_of
    from workers.kv_transfer.sender import DEFAULT_CHUNK_BYTES, encode_payload

    payload = synthetic_layer(shape, n, kv_dtype)
    sections = _sections(payload)
    bare_frames = encode_payload("bare", payload, wire_dtype_of(kv_dtype), 0, chunk_bytes or DEFAULT_CHUNK_BYTES)
    nbytes = shape.num_layers * sum(len(s) for s in sections) * streams
    for t, client in clients.items():
        _grpc_once(server, client, layout, payload, kv_dtype, n, 1, chunk_bytes, f"warm-{n}-{t}")
    kv_times: dict[int, list[float]] = {t: [] for t in clients}
    r_times, b_times = [], []
    wide = sorted({t for t in clients if t > 1}) if streams == 1 else []  # raw over as many sockets
    wide_times: dict[int, list[float]] = {t: [] for t in wide}
    kinds = [*(transport_label(t) for t in clients), "raw_tcp", "bare_grpc", *(f"raw_tcp/{t}" for t in wide)]
    cpu = {k: [0.0, 0.0] for k in kinds}  # [sender s, receiver s] summed over runs

    def timed(kind: str, rx_pid: int, fn, *a):
        tx0, rx0 = self_cpu_s(), cpu_s(rx_pid)
        out = fn(*a)
        cpu[kind][0] += self_cpu_s() - tx0
        cpu[kind][1] += cpu_s(rx_pid) - rx0
        return out

    for r in range(repeat):  # interleaved, so all see the same background load
        for t, client in clients.items():
            dt, moved = timed(transport_label(t), pids[0], _grpc_once, server, client, layout, payload, kv_dtype, n,
                              streams, chunk_bytes, f"g-{n}-{r}-{t}")
            if moved != nbytes:
                raise RuntimeError(f"{transport_label(t)} moved {moved} bytes, expected {nbytes}")
            kv_times[t].append(dt)
        r_times.append(timed("raw_tcp", pids[1], _raw_tcp_once, raw_port, sections, shape.num_layers, streams))
        for t in wide:
            wide_times[t].append(timed(f"raw_tcp/{t}", pids[1], _raw_tcp_once, raw_port, sections,
                                       shape.num_layers, 1, t))
        if streams == 1:
            b_times.append(timed("bare_grpc", pids[0], bare_grpc_once, bare_channel, bare_frames, shape.num_layers))
    r_s = statistics.median(r_times)
    gb = nbytes * repeat / 1e9
    common = {
        "model_shape": shape.name, "tokens": n, "kv_dtype": kv_dtype.value, "streams": streams,
        "bytes": nbytes, "bytes_per_token": nbytes // (n * streams),
        "raw_tcp_s": r_s, "raw_tcp_gbps": nbytes / r_s / 1e9, "raw_tcp_runs_s": r_times,
        "raw_tcp_sender_cpu_s_per_gb": cpu["raw_tcp"][0] / gb, "raw_tcp_receiver_cpu_s_per_gb": cpu["raw_tcp"][1] / gb,
    }
    if b_times:  # the same frames' sizes through gRPC with no per-byte Python work at either end
        b_s = statistics.median(b_times)
        common.update({"bare_grpc_s": b_s, "bare_grpc_gbps": nbytes / b_s / 1e9, "bare_grpc_over_raw": r_s / b_s,
                       "bare_grpc_runs_s": b_times, "bare_grpc_sender_cpu_s_per_gb": cpu["bare_grpc"][0] / gb,
                       "bare_grpc_receiver_cpu_s_per_gb": cpu["bare_grpc"][1] / gb})
    common.update(stage_rates(layout, payload, kv_dtype, n, chunk_bytes or DEFAULT_DATA_CHUNK_BYTES))
    rows = []
    for t, client in clients.items():
        label, g = transport_label(t), kv_times[t]
        g_s = statistics.median(g)
        row = {**common, "transport": label, "data_stripes": t, "kv_s": g_s,
               "chunk_bytes": chunk_bytes or (DEFAULT_DATA_CHUNK_BYTES if t else DEFAULT_CHUNK_BYTES), "kv_gbps": nbytes / g_s / 1e9,
               "kv_over_raw": r_s / g_s, "kv_over_raw_paired": statistics.median([a / b for a, b in zip(r_times, g, strict=True)]),
               "kv_runs_s": g, "kv_sender_cpu_s_per_gb": cpu[label][0] / gb,
               "kv_receiver_cpu_s_per_gb": cpu[label][1] / gb}
        same = wide_times.get(t, r_times)  # raw TCP over the same number of sockets as this transport
        row.update({"raw_tcp_same_conns_gbps": nbytes / statistics.median(same) / 1e9,
                    "kv_over_raw_same_conns": statistics.median(same) / g_s,
                    "kv_over_raw_same_conns_paired": statistics.median([a / b for a, b in zip(same, g, strict=True)])})
        if overlap:
            row.update(_overlap(server, client, layout, payload, kv_dtype, n, chunk_bytes, g_s / streams,
                                layer_compute_ms))
        rows.append(row)
    return rows


def _overlap(server, client, layout, payload, kv_dtype, n, chunk_bytes, transfer_s, layer_compute_ms) -> dict:
    """Serial (prefill, then send) vs streamed (send each layer as it is computed), one stream."""
    c = (transfer_s / layout.num_layers) if layer_compute_ms is None else layer_compute_ms / 1e3
    compute = c * layout.num_layers
    serial, _ = _grpc_once(server, client, layout, payload, kv_dtype, n, 1, chunk_bytes, f"ser-{n}", c, False)
    streamed, _ = _grpc_once(server, client, layout, payload, kv_dtype, n, 1, chunk_bytes, f"str-{n}", c, True)
    exposed_serial = max(serial - compute, 1e-9)
    exposed_streamed = max(streamed - compute, 0.0)
    return {
        "layer_compute_ms": c * 1e3, "prefill_compute_s": compute, "serial_s": serial, "streamed_s": streamed,
        "exposed_transfer_serial_s": exposed_serial, "exposed_transfer_streamed_s": exposed_streamed,
        "hidden_fraction": max(0.0, 1.0 - exposed_streamed / exposed_serial),
    }


def _transports(spec: str, stripes: str | None) -> list[int]:
    """--transport / --stripes -> data-plane connection counts, 0 for gRPC (ValueError when bad)."""
    out: list[int] = []
    for name in (x for x in spec.split(",") if x):
        if name == "grpc":
            out.append(0)
        elif name == "data":
            if stripes is None:
                from workers.kv_transfer.client import DEFAULT_DATA_STRIPES

                out.append(DEFAULT_DATA_STRIPES)
            else:
                out.extend(int(k) for k in stripes.split(",") if k)
        else:
            raise ValueError(f"unknown transport {name!r} (data, grpc)")
    if not out or any(not 0 <= t <= 16 for t in out):
        raise ValueError("--transport/--stripes: need at least one transport, stripes in [1, 16]")
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    try:
        tokens = [int(x) for x in str(args.tokens).split(",") if x]
        dtypes = [KVDtype(x) for x in str(args.kv_dtype).split(",") if x]
        transports = _transports(str(args.transport), args.stripes)
    except ValueError as e:
        print(f"tandem bench: {e}", file=sys.stderr)
        return 2
    if args.streams < 1 or args.repeat < 1 or any(n < 1 for n in tokens):
        print("tandem bench: --streams, --repeat and --tokens must be >= 1", file=sys.stderr)
        return 2
    result = run_bench(args.model_shape, tokens, dtypes, streams=args.streams, repeat=args.repeat,
                       chunk_bytes=int(args.chunk_mib * (1 << 20)) if args.chunk_mib else None,
                       layer_compute_ms=args.layer_compute_ms,
                       overlap=not args.no_overlap, transports=transports)
    result["command"] = "tandem bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    print(format_table(result))
    if args.json:
        print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0

"""The receiving side's state machine, shared by the gRPC server and the in-process fake.

A `KVReceiver` owns the reservations made on a `KVSink` and turns a stream of frames into
`sink.write_kv_layer` calls. Per request:

    reserve()  -> RESERVED   blocks held under a lease (one reaper thread frees them on expiry)
    OPEN frame -> STREAMING  checked against the reservation and the sink's layout
    CHUNKs     -> each checked (seq, layer, token range, sizes, checksum); a sender payload's
                  chunks are assembled and written as one KVLayerPayload, transcoded to what
                  the sink stores
    FINISH     -> every layer verified complete -> on_complete(request_id, TransferSummary)

Any failure (bad frame, checksum, truncated stream, cancel from either side, lease expiry,
deadline) releases the blocks with `sink.release_kv`, calls `on_failure` and never `on_complete`.
Memory is bounded: each verified chunk is written into the sink straight from the received frame
(no reassembly), so a stream holds one frame at a time (<= max_frame_bytes and <= one layer), and
the sum of those bounds over open streams is capped by `max_inflight_bytes`; gRPC's HTTP/2 flow
control stops a sender that runs ahead.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from orchestrator.core.types import KVDtype, TandemError
from workers.kv_payload import (
    KVCapacityError,
    KVImportError,
    KVLayerPayload,
    KVLayout,
    KVLayoutMismatch,
    KVSink,
)
from workers.kv_transfer import control
from workers.kv_transfer.errors import (
    FrameError,
    KVTransferError,
    LeaseExpired,
    TransferCancelled,
    UnknownTransfer,
)
from workers.kv_transfer.fp8 import WireDtype, transcode, wire_dtype_of
from workers.kv_transfer.leases import LeaseReaper
from workers.kv_transfer.verify import decode_checked
from workers.kv_transfer.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    ChunkFrame,
    FinishFrame,
    Frame,
    OpenFrame,
)

log = logging.getLogger(__name__)


class TransferState(enum.StrEnum):
    RESERVED = "reserved"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferSummary:
    """What on_complete receives: enough for the decode worker to call engine.add_request_from_kv."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    num_tokens: int
    bytes_received: int  # payload bytes (K, V and scales) as they crossed the wire
    wire_dtype: WireDtype
    sink_dtype: KVDtype
    num_chunks: int
    receive_ms: float  # OPEN frame to FINISH verified
    write_ms: float  # time inside sink.write_kv_layer (transcoding included)
    src_block_size: int


@dataclass
class _Reservation:
    request_id: str
    layout: KVLayout
    num_tokens: int
    lease_s: float
    expires_at: float = 0.0  # time.monotonic() deadline of the lease
    state: TransferState = TransferState.RESERVED
    error: TandemError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_abort: Callable[[], None] | None = None  # the transport's hook to end a live stream


def _readonly_tensor(view: memoryview) -> torch.Tensor:
    """A uint8 tensor over received bytes without copying (torch warns about read-only memory;
    the tensor is never written: the sink copies into its cache)."""
    if not view.readonly:  # the data plane's own buffers: nothing to silence
        return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
    with _WARN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)


_WARN_LOCK = threading.Lock()


def payload_bound_bytes(num_tokens: int, num_kv_heads: int, head_dim: int, wire: WireDtype) -> int:
    """Bytes of one layer's K, V (and scales) for num_tokens: the most one stream buffers."""
    kv = 2 * num_tokens * num_kv_heads * head_dim * wire.bytes_per_element
    return kv + (2 * num_tokens * num_kv_heads * 4 if wire.is_fp8 else 0)


class KVReceiver:
    """Reservations, leases and frame validation in front of a KVSink (thread-safe)."""

    def __init__(
        self,
        sink: KVSink,
        on_complete: Callable[[str, TransferSummary], None],
        *,
        on_failure: Callable[[str, TandemError], None] | None = None,
        default_lease_s: float = 30.0,
        max_inflight_bytes: int = 1 << 30,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        check_values: bool = True,
    ) -> None:
        self.sink = sink
        self.on_complete = on_complete
        self.on_failure = on_failure
        self.default_lease_s = float(default_lease_s)
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.max_frame_bytes = int(max_frame_bytes)
        self.check_values = check_values
        self._lock = threading.Lock()
        self._res: dict[str, _Reservation] = {}
        self._inflight_bytes = 0
        self._closed = False
        self._leases = LeaseReaper(self._expire_if_due)

    # ------------------------------------------------------------ local API (decode worker)

    def reserve(
        self, request_id: str, layout: KVLayout, num_tokens: int, lease_s: float | None = None,
        *, max_new_tokens: int = 0,
    ) -> None:
        """Reserve blocks for an incoming transfer; freed if not completed within the lease.

        max_new_tokens > 0 is passed to `sink.reserve_kv` (the native engine then also reserves the
        blocks decoding will need); 0 calls the plain KVSink signature.
        """
        lease = self.default_lease_s if lease_s is None else float(lease_s)
        if not lease > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.sink.kv_layout.check_compatible(layout)
        with self._lock:
            if self._closed:
                raise TransferCancelled("the receiver is shut down")
            if request_id in self._res:
                raise KVImportError(f"request {request_id!r} already has a reservation")
            res = _Reservation(request_id, layout, int(num_tokens), lease, expires_at=time.monotonic() + lease)
            self._res[request_id] = res
        with res.lock:  # a stream that races ahead of the sink's reservation waits for it
            try:
                if max_new_tokens > 0:
                    self.sink.reserve_kv(request_id, layout, int(num_tokens), max_new_tokens=int(max_new_tokens))  # type: ignore[call-arg]
                else:
                    self.sink.reserve_kv(request_id, layout, int(num_tokens))
            except BaseException:
                with self._lock:
                    self._res.pop(request_id, None)
                res.state = TransferState.FAILED
                raise
        self._leases.add(request_id, res.expires_at)

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Cancel a reservation or a live transfer; frees its blocks. False when unknown."""
        return self._fail(request_id, TransferCancelled(f"transfer {request_id!r} {reason}"))

    def close(self) -> None:
        """Cancel everything (server shutdown)."""
        with self._lock:
            self._closed = True
            ids = list(self._res)
        for rid in ids:
            self.cancel(rid, "cancelled: receiver shutting down")
        self._leases.stop()

    def counts(self) -> tuple[int, int]:
        """(streaming transfers, all reservations)."""
        with self._lock:
            streaming = sum(r.state is TransferState.STREAMING for r in self._res.values())
            return streaming, len(self._res)

    # ------------------------------------------------------------ control RPC bodies

    def handshake(self, body: bytes, data_port: int = 0) -> bytes:
        decode_peer = control.decode_handshake_request(body)
        version, peer_hash, _peer_layout = decode_peer
        mine = self.sink.kv_layout
        ok = version == PROTOCOL_VERSION and peer_hash == mine.compat_hash(PROTOCOL_VERSION)
        return control.encode_handshake_reply(ok, mine, data_port)

    def health(self, data_port: int = 0) -> bytes:
        return control.encode_health(*self.counts(), data_port=data_port)

    # ------------------------------------------------------------ streams

    def begin(self, frames_held: int = 1) -> Session:
        """A new incoming stream. frames_held: how many frames its transport may hold at once (the
        gRPC stream 1; the data plane its reorder window + one per connection + the one verified),
        charged against max_inflight_bytes at OPEN."""
        return Session(self, frames_held)

    def _expire_if_due(self, request_id: str) -> None:
        with self._lock:
            res = self._res.get(request_id)
            if res is None or time.monotonic() < res.expires_at:
                return
            lease = res.lease_s
        self._fail(request_id, LeaseExpired(f"lease of {lease:g} s on request {request_id!r} expired before its KV arrived"))

    def _fail(self, request_id: str, err: TandemError) -> bool:
        with self._lock:
            res = self._res.pop(request_id, None)
        if res is None:
            return False
        hook = None
        with res.lock:  # waits for an in-progress layer write to finish
            if res.state in (TransferState.COMPLETE, TransferState.FAILED):
                return False
            res.state, res.error = TransferState.FAILED, err
            self.sink.release_kv(request_id)
            hook = res.on_abort
        if hook is not None:
            try:
                hook()
            except Exception:  # pragma: no cover - best effort to end the peer's stream
                log.exception("abort hook failed for %s", request_id)
        if self.on_failure is not None:
            self.on_failure(request_id, err)
        return True

    def _claim(self, frame: OpenFrame, frames_held: int = 1) -> _Reservation:
        with self._lock:
            res = self._res.get(frame.request_id)
            if res is None:
                raise UnknownTransfer(f"no reservation for request {frame.request_id!r}: reserve before streaming")
            if res.state is not TransferState.RESERVED:
                raise FrameError(f"request {frame.request_id!r} is already {res.state.value}")
            bound = self.stream_bound_bytes(frame) * frames_held
            if self._inflight_bytes + bound > self.max_inflight_bytes:
                raise KVCapacityError(
                    f"receiver buffer budget exhausted: {self._inflight_bytes} + {bound} bytes > "
                    f"max_inflight_bytes={self.max_inflight_bytes}; retry later"
                )
            self._inflight_bytes += bound
            res.state = TransferState.STREAMING
            return res

    def stream_bound_bytes(self, f: OpenFrame) -> int:
        """The most one stream holds at once: one frame, itself no larger than a layer of the request."""
        layer = payload_bound_bytes(f.num_tokens, f.num_kv_heads, f.head_dim, f.wire_dtype)
        return min(layer, self.max_frame_bytes)

    def _unbudget(self, nbytes: int) -> None:
        with self._lock:
            self._inflight_bytes -= nbytes


class Session:
    """One incoming stream. Feed it frames in order; it returns the ack after a valid FINISH."""

    def __init__(self, receiver: KVReceiver, frames_held: int = 1) -> None:
        self.r = receiver
        self.frames_held = max(1, int(frames_held))
        self.res: _Reservation | None = None
        self.open: OpenFrame | None = None
        self.next_seq = 0
        self.received: list[int] = []
        self.open_payload: tuple[int, int] | None = None  # (layer, next token) of a payload in progress
        self.nbytes = 0
        self.budget = 0
        self.t_open = 0.0
        self.write_s = 0.0
        self.done = False

    def set_abort_hook(self, hook: Callable[[], None]) -> None:
        self._abort_hook = hook

    def feed(self, data: bytes | memoryview) -> control.TransferAck | None:
        """Process one frame. Raises a typed error (and releases the blocks) on any problem."""
        return self.feed_frame(data)

    def feed_frame(self, item: bytes | memoryview | Frame | TandemError) -> control.TransferAck | None:
        """`feed` for a frame's bytes, or for a frame a transport already passed through
        `decode_checked` on another thread (or the typed error that raised, failing the stream here,
        in stream order)."""
        try:
            if isinstance(item, TandemError):
                raise item
            if not isinstance(item, OpenFrame | ChunkFrame | FinishFrame):
                item = decode_checked(item, self.r.max_frame_bytes, self.r.check_values)
            return self._feed(item)
        except TandemError as e:
            self.abort(e)
            raise
        except Exception as e:  # a bug or a sink failure: still never leak blocks
            err = KVImportError(f"receiving failed: {type(e).__name__}: {e}")
            self.abort(err)
            raise err from e

    def abort(self, err: TandemError) -> None:
        """End the stream with an error; frees the reservation if this stream owns it."""
        if self.done:
            return
        self.done = True
        if self.budget:
            self.r._unbudget(self.budget)
            self.budget = 0
        if self.res is not None:
            self.res.on_abort = None
            self.r._fail(self.res.request_id, err)

    def _feed(self, frame: Frame) -> control.TransferAck | None:
        if self.done:
            raise FrameError("frame after the end of the stream")
        if self.open is None:
            if not isinstance(frame, OpenFrame):
                raise FrameError(f"stream must start with an open frame, got {type(frame).__name__}")
            self._on_open(frame)
            return None
        res = self.res
        assert res is not None
        if frame.request_id != self.open.request_id:
            raise FrameError(f"frame for {frame.request_id!r} inside the stream of {self.open.request_id!r}")
        if isinstance(frame, OpenFrame):
            raise FrameError("duplicate open frame")
        if frame.seq != self.next_seq:
            kind = "duplicate" if frame.seq < self.next_seq else "out-of-order"
            raise FrameError(f"{kind} frame: seq {frame.seq}, expected {self.next_seq}")
        self.next_seq += 1
        with res.lock:
            if res.state is not TransferState.STREAMING:
                raise res.error or TransferCancelled(f"transfer {res.request_id!r} is {res.state.value}")
            if isinstance(frame, ChunkFrame):
                self._on_chunk(frame, res)
                return None
            return self._on_finish(frame, res)

    def _on_open(self, f: OpenFrame) -> None:
        self.res = res = self.r._claim(f, self.frames_held)  # raises UnknownTransfer / KVCapacityError
        self.budget = self.r.stream_bound_bytes(f) * self.frames_held
        res.on_abort = getattr(self, "_abort_hook", None)
        sink_layout = self.r.sink.kv_layout
        if f.compat_hash != sink_layout.compat_hash(PROTOCOL_VERSION):
            raise KVLayoutMismatch(
                f"request {f.request_id!r}: layout hash {f.compat_hash} differs from this receiver's "
                f"{sink_layout.compat_hash(PROTOCOL_VERSION)}; run handshake() to see which factor differs"
            )
        if (f.num_layers, f.num_kv_heads, f.head_dim) != (
            sink_layout.num_layers, sink_layout.num_kv_heads, sink_layout.head_dim,
        ):
            raise FrameError("open frame: layer/head/dim counts contradict the layout hash")
        self.open = f
        if f.num_tokens != res.num_tokens:
            raise FrameError(f"open frame: {f.num_tokens} tokens but {res.num_tokens} were reserved")
        self.received = [0] * f.num_layers
        self.t_open = time.perf_counter()

    def _on_chunk(self, c: ChunkFrame, res: _Reservation) -> None:
        o = self.open
        assert o is not None
        if c.wire_dtype is not o.wire_dtype:
            raise FrameError(f"chunk dtype {c.wire_dtype.value} differs from the stream's {o.wire_dtype.value}")
        if c.layer_start >= o.num_layers or c.token_end > o.num_tokens:
            raise FrameError(
                f"chunk layer {c.layer_start} tokens [{c.token_start}, {c.token_end}) outside "
                f"{o.num_layers} layers x {o.num_tokens} tokens"
            )
        if self.open_payload is not None:
            expected_layer, expected_tok = self.open_payload
        else:
            expected_layer, expected_tok = c.layer_start, self.received[c.layer_start]
        if c.layer_start != expected_layer:
            raise FrameError(f"out-of-order chunk: layer {c.layer_start} while layer {expected_layer}'s payload is open")
        if c.token_start != expected_tok:
            kind = "duplicate" if c.token_start < expected_tok else "out-of-order"
            raise FrameError(
                f"{kind} chunk: layer {c.layer_start} tokens from {c.token_start}, expected {expected_tok}"
            )
        ntok, el = c.token_end - c.token_start, o.wire_dtype.bytes_per_element
        kv_len = ntok * o.num_kv_heads * o.head_dim * el
        sc_len = ntok * o.num_kv_heads * 4 if o.wire_dtype.is_fp8 else 0
        if c.lengths != (kv_len, kv_len, sc_len, sc_len):
            raise FrameError(f"chunk section sizes {list(c.lengths)} != expected {[kv_len, kv_len, sc_len, sc_len]}")
        self._write_chunk(c, res)
        self.nbytes += len(c.payload)
        self.received[c.layer_start] = c.token_end
        self.open_payload = None if c.end_of_payload else (c.layer_start, c.token_end)

    def _write_chunk(self, c: ChunkFrame, res: _Reservation) -> None:
        """Write one verified chunk into the sink as a KVLayerPayload of its token range.

        The tensors view the received frame's bytes (no copy): the sink must treat them as
        read-only and copy what it keeps (a paged cache does).
        """
        o = self.open
        assert o is not None
        ntok, h, d, wire, layer = c.token_end - c.token_start, o.num_kv_heads, o.head_dim, o.wire_dtype, c.layer_start

        def section(i: int) -> torch.Tensor:
            return _readonly_tensor(c.section(i))

        k = section(0).view(wire.torch_dtype).reshape(ntok, h, d)
        v = section(1).view(wire.torch_dtype).reshape(ntok, h, d)
        ks = vs = None
        if wire.is_fp8:  # values were checked with the frame (verify.decode_checked)
            ks = section(2).view(torch.float32).reshape(ntok, h)
            vs = section(3).view(torch.float32).reshape(ntok, h)
        payload = KVLayerPayload(layer=layer, token_start=c.token_start, k=k, v=v, k_scale=ks, v_scale=vs)
        t = time.perf_counter()
        target = getattr(self.r.sink, "kv_wire_dtype", None) or wire_dtype_of(self.r.sink.kv_dtype)
        self.r.sink.write_kv_layer(res.request_id, transcode(payload, wire, target))
        self.write_s += time.perf_counter() - t

    def _on_finish(self, f: FinishFrame, res: _Reservation) -> control.TransferAck:
        o = self.open
        assert o is not None
        if self.open_payload is not None:
            raise FrameError("finish frame while a layer payload is still open (missing end-of-payload chunk)")
        missing = [i for i, n in enumerate(self.received) if n != o.num_tokens]
        if missing:
            raise FrameError(f"truncated transfer: layers {missing[:8]} incomplete at finish")
        if f.num_chunks != self.next_seq - 1 or f.payload_bytes != self.nbytes:
            raise FrameError(
                f"finish totals ({f.num_chunks} chunks, {f.payload_bytes} bytes) != received "
                f"({self.next_seq - 1} chunks, {self.nbytes} bytes)"
            )
        self.done = True
        res.state = TransferState.COMPLETE
        res.on_abort = None
        with self.r._lock:
            self.r._res.pop(res.request_id, None)
        self.r._unbudget(self.budget)
        self.budget = 0
        ms = (time.perf_counter() - self.t_open) * 1e3
        summary = TransferSummary(
            request_id=res.request_id, prompt_token_ids=o.prompt_token_ids, first_token_id=f.first_token_id,
            num_tokens=o.num_tokens, bytes_received=self.nbytes, wire_dtype=o.wire_dtype,
            sink_dtype=self.r.sink.kv_dtype, num_chunks=self.next_seq - 1, receive_ms=ms,
            write_ms=self.write_s * 1e3, src_block_size=o.src_block_size,
        )
        try:
            self.r.on_complete(res.request_id, summary)
        except Exception as e:
            self.r.sink.release_kv(res.request_id)
            err = KVTransferError(f"on_complete failed for {res.request_id!r}: {type(e).__name__}: {e}")
            if self.r.on_failure is not None:
                self.r.on_failure(res.request_id, err)
            raise err from e
        return control.TransferAck(
            request_id=res.request_id, num_tokens=o.num_tokens, num_chunks=self.next_seq - 1,
            bytes_received=self.nbytes, wire_dtype=o.wire_dtype, receive_ms=ms,
        )

"""`KVTransferClient`: the prefill side's connection to a decode worker's KVTransferServer."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import grpc

from orchestrator.core.types import KVDtype, TandemError
from workers.kv_payload import KVCapacityError, KVLayerPayload, KVLayout, KVLayoutMismatch
from workers.kv_transfer import control
from workers.kv_transfer.dataplane_client import DataPlaneStream
from workers.kv_transfer.dataplane_codec import MAX_STRIPES
from workers.kv_transfer.errors import (
    KVTransferError,
    TransferAuthError,
    TransferCancelled,
    TransferDeadlineExceeded,
    TransferUnavailable,
    error_from_name,
)
from workers.kv_transfer.fp8 import WireDtype
from workers.kv_transfer.memory import tune_malloc_for_streaming
from workers.kv_transfer.security import (
    ERROR_METADATA_KEY,
    SERVICE_NAME,
    TOKEN_METADATA_KEY,
    TLSConfig,
    check_token,
)
from workers.kv_transfer.sender import DEFAULT_CHUNK_BYTES, KVStream
from workers.kv_transfer.server import channel_options
from workers.kv_transfer.wire import DEFAULT_MAX_FRAME_BYTES, MAX_HEADER_BYTES, PROTOCOL_VERSION

log = logging.getLogger(__name__)

ABORT_CANCEL_TIMEOUT_S = 2.0  # abort()'s best-effort Cancel RPC; the receiver's lease is the backstop

DEFAULT_PREFETCH_FRAMES = 2  # frames framed ahead of gRPC's send (see GrpcKVStream)
DEFAULT_DATA_STRIPES = 2  # TCP connections per transfer on the data plane (bench: README "Measured")
# Frame size on the data plane when open_stream is not given one: per-frame Python work (header,
# hand-offs between threads, the receiver's bookkeeping) is spread over 4x the bytes of gRPC's 2 MiB;
# measured ~10% less CPU per GB on the sender, ~20% on the receiver (README "Measured"). gRPC keeps
# DEFAULT_CHUNK_BYTES.
DEFAULT_DATA_CHUNK_BYTES = 8 * 1024 * 1024

_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: TransferAuthError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TransferDeadlineExceeded,
    grpc.StatusCode.CANCELLED: TransferCancelled,
    grpc.StatusCode.UNAVAILABLE: TransferUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: KVCapacityError,
}


def error_from_rpc(e: grpc.RpcError) -> TandemError:
    """Map a failed RPC to the typed error the server named (or one chosen by status code)."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    for key, value in (e.trailing_metadata() if hasattr(e, "trailing_metadata") else None) or ():
        if key == ERROR_METADATA_KEY:
            return error_from_name(str(value), details)
    if code is grpc.StatusCode.CANCELLED:
        details = f"{details} (cancelled by either side, the receiver's lease ran out, or it shut down)"
    return _BY_CODE.get(code, KVTransferError)(details)


class KVTransferClient:
    """Connection to `target` ("127.0.0.1:PORT"). Thread-safe; open many streams on one client."""

    def __init__(
        self,
        target: str,
        *,
        auth_token: str,
        tls: TLSConfig | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        timeout_s: float = 10.0,
        tune_malloc: bool = True,
        data_plane: bool = True,
        data_stripes: int = DEFAULT_DATA_STRIPES,
    ) -> None:
        """data_plane: stream over the receiver's raw-TCP data plane when it offers one (protocol 3,
        dataplane.py; never with TLS), striped over data_stripes connections (1..16); otherwise, or
        with data_plane=False, over a gRPC PushKV stream."""
        if not 1 <= data_stripes <= MAX_STRIPES:
            raise ValueError(f"data_stripes must be in [1, {MAX_STRIPES}], got {data_stripes}")
        if tune_malloc:  # process-wide glibc thresholds (memory.py): frames stop page-faulting
            tune_malloc_for_streaming()
        self.target = target
        self.auth_token = check_token(auth_token)
        self._md = ((TOKEN_METADATA_KEY, self.auth_token),)
        self.data_plane = data_plane and tls is None
        self.data_stripes = int(data_stripes)
        self._data_port: int | None = None  # learnt from the receiver's Health reply
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        opts = channel_options(max_frame_bytes + MAX_HEADER_BYTES)
        if tls is not None:
            if tls.server_name_override:
                opts = [*opts, ("grpc.ssl_target_name_override", tls.server_name_override)]
            self._channel = grpc.secure_channel(target, tls.channel_credentials(), options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        m = f"/{SERVICE_NAME}/"
        self._handshake = self._channel.unary_unary(m + "Handshake")
        self._health = self._channel.unary_unary(m + "Health")
        self._cancel = self._channel.unary_unary(m + "Cancel")
        self._push = self._channel.stream_unary(m + "PushKV")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVTransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, body: bytes) -> bytes:
        try:
            return method(body, timeout=self.timeout_s, metadata=self._md)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def handshake(self, layout: KVLayout) -> None:
        """Compare layouts with the receiver; KVLayoutMismatch names every differing factor."""
        reply = control.decode_handshake_reply(self._call(self._handshake, control.encode_handshake_request(layout)))
        if reply.ok:
            self._data_port = reply.data_port
            return
        diffs = layout.mismatches(reply.layout)
        if reply.protocol_version != PROTOCOL_VERSION:
            diffs.insert(0, f"protocol_version: {PROTOCOL_VERSION} here vs {reply.protocol_version} at peer")
        raise KVLayoutMismatch("KV layout mismatch with " + self.target + ": " + "; ".join(diffs or ["compat hash"]))

    def health(self) -> control.Health:
        h = control.decode_health(self._call(self._health, b""))
        self._data_port = h.data_port
        return h

    def data_address(self) -> tuple[str, int] | None:
        """(host, port) of the receiver's data plane, or None when it is not used (asks Health once)."""
        if not self.data_plane:
            return None
        if self._data_port is None:
            try:
                self.health()
            except TandemError:  # the PushKV fallback reports the reason
                return None
        if not self._data_port:
            return None
        host = self.target.rsplit(":", 1)[0]
        return host.strip("[]"), self._data_port

    def cancel(self, request_id: str) -> bool:
        """Ask the receiver to drop request_id's reservation/transfer. True when it existed."""
        reply = control.unpack_map(self._call(self._cancel, control.encode_cancel(request_id)), "cancel reply")
        return reply.get("found") is True

    def open_stream(
        self,
        request_id: str,
        layout: KVLayout,
        kv_dtype: KVDtype,
        prompt_token_ids: Sequence[int],
        *,
        deadline_s: float = 30.0,
        wire_dtype: WireDtype | None = None,
        chunk_bytes: int | None = None,
        max_queue_bytes: int = 64 * 1024 * 1024,
        src_block_size: int = 0,
    ) -> GrpcKVStream | DataPlaneStream:
        """Start a transfer (the receiver must have reserved request_id). See sender.KVStream.

        Over the receiver's data plane when there is one (`data_address`), else a gRPC PushKV stream.
        chunk_bytes: payload bytes per frame (None: DEFAULT_DATA_CHUNK_BYTES on the data plane,
        DEFAULT_CHUNK_BYTES on gRPC); at most half the client's max_frame_bytes either way."""
        addr = self.data_address()
        if addr is not None:
            try:
                return DataPlaneStream(
                    self, addr[0], addr[1], request_id, layout, kv_dtype, prompt_token_ids, deadline_s=deadline_s,
                    wire_dtype=wire_dtype,
                    chunk_bytes=min(chunk_bytes or DEFAULT_DATA_CHUNK_BYTES, self.max_frame_bytes // 2),
                    max_queue_bytes=max_queue_bytes, src_block_size=src_block_size, stripes=self.data_stripes,
                )
            except TransferUnavailable as e:  # e.g. a firewall lets gRPC through but not the data port
                log.warning("%s; this client falls back to gRPC streams", e)
                self.data_plane = False
        return GrpcKVStream(
            self, request_id, layout, kv_dtype, prompt_token_ids, deadline_s=deadline_s, wire_dtype=wire_dtype,
            chunk_bytes=min(chunk_bytes or DEFAULT_CHUNK_BYTES, self.max_frame_bytes // 2), max_queue_bytes=max_queue_bytes,
            src_block_size=src_block_size,
        )


class GrpcKVStream(KVStream):
    """A PushKV call fed from a queue bounded in bytes (flow control on the sender).

    Two threads work for it: a framer thread turns queued payloads into frames (CRC32C, header, one
    join) and keeps up to `prefetch_frames` of them ready, while gRPC's request-consumer thread
    hands the previous one to the transport and waits for it to be sent. gRPC sends one message at a
    time and waits for each, so without the framer, checksumming frame i+1 could not overlap sending
    frame i. Memory held: max_queue_bytes of payloads (+ the one being framed) + prefetch_frames frames.
    """

    def __init__(
        self, client: KVTransferClient, request_id: str, layout: KVLayout, kv_dtype: KVDtype,
        prompt_token_ids: Sequence[int], *, deadline_s: float, max_queue_bytes: int,
        prefetch_frames: int = DEFAULT_PREFETCH_FRAMES, **kw,
    ) -> None:
        super().__init__(request_id, layout, kv_dtype, prompt_token_ids, **kw)
        self.deadline = time.monotonic() + deadline_s
        self.max_queue_bytes = max(int(max_queue_bytes), 1)
        # queue items: a frame (bytes), a payload to frame lazily (payload, first_seq, nbytes), or None (end)
        self._q: collections.deque[bytes | tuple[KVLayerPayload, int, int] | None] = collections.deque(
            [self._open_frame]
        )
        self._qbytes = len(self._open_frame)
        self._cv = threading.Condition()
        # frames ready for gRPC: bytes, the framer's exception, or None (end of stream)
        self._frames: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=max(1, int(prefetch_frames)))
        self._stop = threading.Event()
        self._local_error: TandemError | None = None
        self._client = client
        self._future: grpc.Future | None = None
        self._framer = threading.Thread(target=self._frame_loop, name="kv-tx-framer", daemon=True)
        self._framer.start()
        self._future = client._push.future(self._requests(), timeout=deadline_s, metadata=client._md)

    @property
    def queued_bytes(self) -> int:
        """Payload bytes queued and not yet fully framed (bounded by max_queue_bytes + one payload)."""
        return self._qbytes

    def _ended(self) -> bool:
        return self._stop.is_set() or (self._future is not None and self._future.done())

    def _put(self, item: bytes | BaseException | None) -> bool:
        """Hand a frame to gRPC's thread; False when the stream ended meanwhile (nobody will take it)."""
        while not self._ended():
            try:
                self._frames.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _frame_loop(self) -> None:
        """The framer thread: payloads -> frames, ahead of gRPC's sends (GIL released in CRC32C)."""
        try:
            while True:
                with self._cv:
                    while not self._q:
                        if self._ended():  # the call failed or was aborted: nothing more to frame
                            return
                        self._cv.wait(timeout=0.05)
                    item = self._q.popleft()
                if item is None:
                    break
                if isinstance(item, bytes):
                    if not self._put(item):
                        return
                    cost = len(item)
                else:
                    payload, first_seq, cost = item
                    for frame in self.frames_of(payload, first_seq):
                        if not self._put(frame):
                            return
                with self._cv:
                    self._qbytes -= cost
                    self._cv.notify_all()
        except BaseException as e:  # surfaces in gRPC's iterator: the call fails instead of hanging
            self._local_error = KVTransferError(f"framing failed: {type(e).__name__}: {e}")
            self._cancel_remote()  # the stream may fail before it reached the receiver's handler
            self._put(e)
            return
        self._put(None)

    def _requests(self) -> Iterator[bytes]:
        """Runs on gRPC's request-consumer thread: yields the framer's frames in order."""
        while True:
            try:
                item = self._frames.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _error(self) -> TandemError:
        if self._local_error is not None:  # a local failure is the real cause of the cut stream
            return self._local_error
        try:
            self._future.result(timeout=0)
        except grpc.RpcError as e:
            return error_from_rpc(e)
        except grpc.FutureCancelledError:
            return TransferCancelled(f"stream {self.request_id!r} was aborted")
        return KVTransferError(f"stream {self.request_id!r}: the receiver answered before the finish frame")

    def _emit(self, payload: KVLayerPayload, first_seq: int, payload_bytes: int) -> None:
        with self._cv:
            while self._qbytes + payload_bytes > self.max_queue_bytes and self._qbytes > 0:
                if self._future.done():
                    raise self._error()
                if time.monotonic() > self.deadline:
                    self.abort()
                    raise TransferDeadlineExceeded(f"stream {self.request_id!r}: deadline passed while queued")
                self._cv.wait(timeout=0.05)
            if self._future.done():
                raise self._error()
            self._q.append((payload, first_seq, payload_bytes))
            self._qbytes += payload_bytes
            self._cv.notify_all()

    def _finish(self, frame: bytes) -> control.TransferAck:
        with self._cv:
            self._q.append(frame)
            self._qbytes += len(frame)
            self._q.append(None)
            self._cv.notify_all()
        try:
            body = self._future.result()
        except grpc.RpcError as e:
            raise (self._local_error or error_from_rpc(e)) from None
        except grpc.FutureCancelledError:
            raise TransferCancelled(f"stream {self.request_id!r} was aborted") from None
        return control.decode_ack(body)

    def _cancel_remote(self) -> None:
        """Best-effort Cancel RPC: the receiver records a cancellation (not a truncated stream) and frees
        the reservation even when the call never reached its handler; if it is unreachable, its lease
        frees the blocks."""
        try:
            self._client._cancel(control.encode_cancel(self.request_id), timeout=ABORT_CANCEL_TIMEOUT_S,
                                 metadata=self._client._md)
        except Exception:  # noqa: BLE001 - the peer may be gone; the lease frees the blocks then
            log.debug("cancel of %s did not reach the receiver", self.request_id)

    def abort(self) -> None:
        self.closed = True
        self._cancel_remote()  # first, so that the receiver records a cancellation
        self._stop.set()  # the framer and gRPC's iterator both return within 50 ms
        if self._future is not None:
            self._future.cancel()
        with self._cv:
            self._q.clear()  # the item being framed right now (if any) still subtracts its cost
            self._q.append(None)
            self._cv.notify_all()

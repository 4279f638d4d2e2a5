"""`KVTransferServer`: the decode side's gRPC endpoint in front of a KVSink.

Four methods of service `tandem.kv.v1.KVTransfer` (proto/tandem_kv.proto documents them), all
registered as raw-bytes generic handlers: no protobuf on any path, bodies are msgpack maps and
PushKV's messages are the frames of `wire.py`. Every RPC checks the shared token first
(UNAUTHENTICATED without it). Typed errors leave as a gRPC status plus trailing metadata
`tandem-error: <ClassName>`; the client re-raises the same class.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from orchestrator.core.types import TandemError
from workers.kv_payload import KVCapacityError, KVImportError, KVLayout, KVLayoutMismatch, KVSink
from workers.kv_transfer import control
from workers.kv_transfer.dataplane import DataPlaneServer
from workers.kv_transfer.errors import (
    ChecksumError,
    FrameError,
    LeaseExpired,
    TransferAuthError,
    TransferCancelled,
    TransferDeadlineExceeded,
    UnknownTransfer,
)
from workers.kv_transfer.memory import tune_malloc_for_streaming
from workers.kv_transfer.receiver import KVReceiver, TransferSummary
from workers.kv_transfer.security import (
    ERROR_METADATA_KEY,
    SERVICE_NAME,
    TOKEN_METADATA_KEY,
    TLSConfig,
    check_token,
)
from workers.kv_transfer.wire import DEFAULT_MAX_FRAME_BYTES, MAX_HEADER_BYTES

log = logging.getLogger(__name__)

METHODS = ("Handshake", "PushKV", "Cancel", "Health")

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (TransferAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ChecksumError, grpc.StatusCode.DATA_LOSS),
    (FrameError, grpc.StatusCode.INVALID_ARGUMENT),
    (KVLayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownTransfer, grpc.StatusCode.NOT_FOUND),
    (KVCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LeaseExpired, grpc.StatusCode.ABORTED),
    (TransferCancelled, grpc.StatusCode.CANCELLED),
    (TransferDeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (KVImportError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_of(err: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Message-size limits, set identically on both ends."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class KVTransferServer:
    """gRPC server on `host:port` receiving KV into `sink` (see workers/kv_transfer/README.md).

    on_complete(request_id, TransferSummary) fires once per transfer, after every layer was written
    and verified. On any failure the blocks are released (sink.release_kv), on_failure (if given)
    receives the typed error, and on_complete is never called.
    """

    def __init__(
        self,
        sink: KVSink,
        on_complete: Callable[[str, TransferSummary], None],
        *,
        auth_token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSConfig | None = None,
        max_inflight_bytes: int = 1 << 30,
        default_lease_s: float = 30.0,
        on_failure: Callable[[str, TandemError], None] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_workers: int = 8,
        check_values: bool = True,
        tune_malloc: bool = True,
        data_plane: bool = True,
        data_port: int = 0,
    ) -> None:
        """data_plane: also accept transfers over a raw-TCP data plane on host:data_port (protocol 3,
        dataplane.py), advertised in Health/Handshake replies. Never with TLS (the data plane is
        plaintext): then only gRPC streams are accepted and data_port is ignored.

        data_port: 0 = an ephemeral port (the default); 1-65535 = exactly that port on `host`, for
        firewalled clusters (open it like the gRPC port); `start()` raises OSError naming it when it
        cannot be bound (nothing is left listening then). Out of range: ValueError here."""
        if not 0 <= int(data_port) <= 65535:
            raise ValueError(f"data_port must be 0 (ephemeral) or a TCP port 1-65535, got {data_port!r}")
        self._token = check_token(auth_token).encode()
        self.host, self._port, self.tls = host, int(port), tls
        self.receiver = KVReceiver(
            sink, on_complete, on_failure=on_failure, default_lease_s=default_lease_s,
            max_inflight_bytes=max_inflight_bytes, max_frame_bytes=max_frame_bytes, check_values=check_values,
        )
        self.max_message_bytes = max_frame_bytes + MAX_HEADER_BYTES
        self._max_workers = max_workers
        self._tune_malloc = tune_malloc
        self._server: grpc.Server | None = None
        self._data: DataPlaneServer | None = None
        self._data_wanted = data_plane and tls is None
        self._data_port_arg = int(data_port)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Bind and serve; returns the port (an ephemeral one when port=0).

        Unless built with tune_malloc=False, first applies `memory.tune_malloc_for_streaming()`
        (process-wide glibc thresholds: frames stop page-faulting fresh memory in)."""
        if self._tune_malloc:
            tune_malloc_for_streaming()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="kv-rx"),
            options=[*channel_options(self.max_message_bytes), ("grpc.so_reuseport", 0)],  # a taken port fails
        )
        handlers = {
            "Handshake": grpc.unary_unary_rpc_method_handler(self._handshake),
            "PushKV": grpc.stream_unary_rpc_method_handler(self._push),
            "Cancel": grpc.unary_unary_rpc_method_handler(self._cancel),
            "Health": grpc.unary_unary_rpc_method_handler(self._health),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        addr = f"{self.host}:{self._port}"
        if self.tls is not None:
            port = server.add_secure_port(addr, self.tls.server_credentials())
        else:
            port = server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"could not bind the KV transfer server to {addr}")
        if self._data_wanted:
            data = DataPlaneServer(self.receiver, self._token, self.host, self._data_port_arg)
            try:
                data.start()
            except OSError as e:
                server.stop(0)
                raise OSError(e.errno, f"could not bind the KV data plane to {self.host}:{self._data_port_arg}: "
                                       f"{e.strerror or e}") from e
            self._data = data
        server.start()
        self._server, self._port = server, port
        return port

    def stop(self, grace_s: float = 1.0) -> None:
        """Cancel every transfer (blocks released) and stop serving."""
        self.receiver.close()
        if self._data is not None:
            self._data.stop()
            self._data = None
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self._port}"

    @property
    def data_port(self) -> int:
        """The data plane's TCP port (0 when there is none: disabled, TLS, or not started)."""
        return self._data.port if self._data is not None else 0

    # ------------------------------------------------------------ local calls (decode worker)

    def reserve(
        self, request_id: str, layout: KVLayout, num_tokens: int, lease_s: float | None = None,
        *, max_new_tokens: int = 0,
    ) -> None:
        """Reserve KV blocks for an incoming transfer under a lease (default_lease_s when None)."""
        self.receiver.reserve(request_id, layout, num_tokens, lease_s, max_new_tokens=max_new_tokens)

    def cancel(self, request_id: str) -> bool:
        """Receiver-side cancel: frees the blocks and ends a live stream. False when unknown."""
        return self.receiver.cancel(request_id, "cancelled by the receiver")

    # ------------------------------------------------------------ handlers

    def _fail_rpc(self, context: grpc.ServicerContext, err: Exception) -> None:
        context.set_trailing_metadata(((ERROR_METADATA_KEY, type(err).__name__),))
        context.abort(status_of(err), str(err))

    def _auth(self, context: grpc.ServicerContext) -> None:
        got = b""
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
        if not hmac.compare_digest(got, self._token):
            self._fail_rpc(context, TransferAuthError("missing or wrong KV channel token"))

    def _unary(self, fn: Callable[[bytes], bytes], body: bytes, context: grpc.ServicerContext) -> bytes:
        self._auth(context)
        try:
            return fn(body)
        except TandemError as e:
            self._fail_rpc(context, e)
        raise AssertionError("unreachable")  # pragma: no cover

    def _handshake(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        return self._unary(lambda b: self.receiver.handshake(b, self.data_port), body, context)

    def _health(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        return self._unary(lambda _b: self.receiver.health(self.data_port), body, context)

    def _cancel(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        def do(b: bytes) -> bytes:
            found = self.receiver.cancel(control.decode_cancel(b), "cancelled by the sender")
            return control.pack({"ok": True, "found": found})

        return self._unary(do, body, context)

    @staticmethod
    def _ended_early(context: grpc.ServicerContext) -> TandemError | None:
        """The reason a stream ended without FINISH when gRPC knows it (deadline, cancellation)."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return TransferDeadlineExceeded("the transfer's deadline passed before it finished")
        if not context.is_active():
            return TransferCancelled("the sender cancelled the stream or its connection was lost")
        return None

    def _push(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._auth(context)
        session = self.receiver.begin()
        session.set_abort_hook(context.cancel)
        err: TandemError | None = None
        try:
            for data in request_iterator:
                ack = session.feed(data)
                if ack is not None:
                    return control.encode_ack(ack)
            err = self._ended_early(context) or FrameError(
                "truncated stream: the sender closed it without a finish frame"
            )
        except TandemError as e:
            err = e
        except grpc.RpcError:  # the sender went away (cancelled, deadline, connection lost)
            err = self._ended_early(context) or TransferCancelled(
                "the sender cancelled the stream or its connection was lost"
            )
        except Exception as e:  # never leak blocks on a bug
            log.exception("KV push failed")
            err = KVImportError(f"{type(e).__name__}: {e}")
        session.abort(err)
        if context.is_active():
            self._fail_rpc(context, err)
        return b""

"""`InProcessKVTransport`: the fake transport (same interface as the gRPC client and server).

Frames are really encoded and decoded (the same `wire.py` codec and the same `KVReceiver` state
machine as the gRPC server), but delivered by a direct call into the receiver in this process:
no sockets, no threads. `send_layer` therefore returns after the layer is written into the sink.
Used by tests and by the simulator's contract tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from orchestrator.core.types import KVDtype, TandemError
from workers.kv_payload import KVLayerPayload, KVLayout, KVLayoutMismatch, KVSink
from workers.kv_transfer import control
from workers.kv_transfer.errors import TransferCancelled, TransferDeadlineExceeded
from workers.kv_transfer.fp8 import WireDtype
from workers.kv_transfer.receiver import KVReceiver, Session, TransferSummary
from workers.kv_transfer.sender import DEFAULT_CHUNK_BYTES, KVStream
from workers.kv_transfer.wire import PROTOCOL_VERSION


class InProcessKVTransport:
    """Client side (handshake/health/cancel/open_stream) and server side (reserve/cancel_local)
    of one receiver, in one object."""

    def __init__(
        self,
        sink: KVSink,
        on_complete: Callable[[str, TransferSummary], None],
        *,
        on_failure: Callable[[str, TandemError], None] | None = None,
        default_lease_s: float = 30.0,
        max_inflight_bytes: int = 1 << 30,
    ) -> None:
        self.receiver = KVReceiver(
            sink, on_complete, on_failure=on_failure, default_lease_s=default_lease_s,
            max_inflight_bytes=max_inflight_bytes,
        )

    # -- receiver side (what KVTransferServer offers locally)
    def reserve(
        self, request_id: str, layout: KVLayout, num_tokens: int, lease_s: float | None = None,
        *, max_new_tokens: int = 0,
    ) -> None:
        self.receiver.reserve(request_id, layout, num_tokens, lease_s, max_new_tokens=max_new_tokens)

    def cancel_local(self, request_id: str) -> bool:
        """Receiver-side cancel (KVTransferServer.cancel)."""
        return self.receiver.cancel(request_id, "cancelled by the receiver")

    def stop(self) -> None:
        self.receiver.close()

    # -- sender side (what KVTransferClient offers)
    def handshake(self, layout: KVLayout) -> None:
        reply = control.decode_handshake_reply(self.receiver.handshake(control.encode_handshake_request(layout)))
        if not reply.ok:
            diffs = layout.mismatches(reply.layout) or ["compat hash"]
            raise KVLayoutMismatch("KV layout mismatch with in-process receiver: " + "; ".join(diffs))

    def health(self) -> control.Health:
        return control.decode_health(self.receiver.health())

    def cancel(self, request_id: str) -> bool:
        return self.receiver.cancel(request_id, "cancelled by the sender")

    def open_stream(
        self,
        request_id: str,
        layout: KVLayout,
        kv_dtype: KVDtype,
        prompt_token_ids: Sequence[int],
        *,
        deadline_s: float = 30.0,
        wire_dtype: WireDtype | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        src_block_size: int = 0,
    ) -> InProcessKVStream:
        return InProcessKVStream(
            self.receiver, request_id, layout, kv_dtype, prompt_token_ids, deadline_s=deadline_s,
            wire_dtype=wire_dtype, chunk_bytes=chunk_bytes, src_block_size=src_block_size,
        )


class InProcessKVStream(KVStream):
    def __init__(
        self, receiver: KVReceiver, request_id: str, layout: KVLayout, kv_dtype: KVDtype,
        prompt_token_ids: Sequence[int], *, deadline_s: float, **kw,
    ) -> None:
        super().__init__(request_id, layout, kv_dtype, prompt_token_ids, **kw)
        self.deadline = time.monotonic() + deadline_s
        self.session: Session = receiver.begin()
        self._feed(self._open_frame)

    def _feed(self, frame: bytes) -> control.TransferAck | None:
        if time.monotonic() > self.deadline:
            err = TransferDeadlineExceeded(f"stream {self.request_id!r}: deadline passed")
            self.session.abort(err)
            self.closed = True
            raise err
        try:
            return self.session.feed(frame)
        except TandemError:
            self.closed = True
            raise

    def _emit(self, payload: KVLayerPayload, first_seq: int, payload_bytes: int) -> None:
        for f in self.frames_of(payload, first_seq):
            self._feed(f)

    def _finish(self, frame: bytes) -> control.TransferAck:
        ack = self._feed(frame)
        assert ack is not None, "a valid finish frame always yields an ack"
        return ack

    def abort(self) -> None:
        self.closed = True
        self.session.abort(TransferCancelled(f"stream {self.request_id!r} aborted by the sender"))


__all__ = ["PROTOCOL_VERSION", "InProcessKVStream", "InProcessKVTransport"]

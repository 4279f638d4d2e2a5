"""`DataPlaneStream`: the sending side of the raw-TCP data plane (protocol 3, see dataplane.py).

`KVTransferClient.open_stream` returns one when the receiver advertises a data port (Health's
`dport`) and the client was not built with `data_plane=False` or TLS. Same contract as every
`KVStream` (sender.py): `send_layer` queues (bounded by `max_queue_bytes`, blocks when full, raises
the receiver's typed error once it failed the transfer), `finish` waits for the ack, `abort` cancels
(Cancel RPC over gRPC, then the connections are closed).

Threads: a planner splits queued payloads into frame specs (no per-byte work) and deals them round
robin by stream position to the connections; per connection a framer checksums its frames (CRC32C
releases the GIL, so connections are checksummed in parallel) and builds their headers, and a sender
writes each frame with one scatter-gather `sendmsg` of envelope + header + the payload sections,
straight from the payload's memory (no join, no copy in Python); a reply reader on connection 0 waits
for the receiver's verdict. Memory held: max_queue_bytes of payloads plus, per connection,
2 x `prefetch_frames` frames that reference payload memory (not copies).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from orchestrator.core.types import KVDtype, TandemError
from workers.kv_payload import KVLayerPayload, KVLayout
from workers.kv_transfer import control
from workers.kv_transfer.dataplane_codec import (
    ENVELOPE,
    MAX_DEADLINE_MS,
    MAX_REPLY_BYTES,
    MAX_STRIPES,
    REPLY_PREFIX,
    decode_reply_body,
    encode_hello,
    recv_exactly,
    send_parts,
    shut,
)
from workers.kv_transfer.errors import (
    FrameError,
    KVTransferError,
    TransferCancelled,
    TransferDeadlineExceeded,
    TransferUnavailable,
)
from workers.kv_transfer.sender import ChunkSpec, KVStream, iter_chunk_specs

if TYPE_CHECKING:
    from workers.kv_transfer.client import KVTransferClient

log = logging.getLogger(__name__)

ABORT_CANCEL_TIMEOUT_S = 2.0
REPLY_GRACE_S = 2.0  # after a send fails, how long to wait for the receiver's typed reason
_POLL_S = 0.05

Parts = list  # [envelope + prefix + header (bytes), *payload sections (memoryview)]


class DataPlaneStream(KVStream):
    """A transfer striped over `stripes` TCP connections to host:port (see the module docstring)."""

    def __init__(
        self, client: KVTransferClient, host: str, port: int, request_id: str, layout: KVLayout,
        kv_dtype: KVDtype, prompt_token_ids: Sequence[int], *, deadline_s: float, max_queue_bytes: int,
        stripes: int = 2, prefetch_frames: int = 2, **kw,
    ) -> None:
        super().__init__(request_id, layout, kv_dtype, prompt_token_ids, **kw)
        if not 1 <= stripes <= MAX_STRIPES:
            raise ValueError(f"stripes must be in [1, {MAX_STRIPES}], got {stripes}")
        self._client = client
        self.stripes = int(stripes)
        self.deadline = time.monotonic() + deadline_s
        self.max_queue_bytes = max(int(max_queue_bytes), 1)
        self._q: collections.deque[bytes | tuple[KVLayerPayload, int, int] | None] = collections.deque(
            [self._open_frame])
        self._qbytes = len(self._open_frame)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._done = threading.Event()  # the reply arrived or the transfer failed locally
        self._result: control.TransferAck | TandemError | None = None
        self._send_error: BaseException | None = None
        self._local_error: TandemError | None = None
        depth = max(1, int(prefetch_frames))
        self._fq: list[queue.Queue[tuple[int, bytes | ChunkSpec] | None]] = [
            queue.Queue(maxsize=depth) for _ in range(self.stripes)]
        self._outq: list[queue.Queue[Parts | None]] = [queue.Queue(maxsize=depth) for _ in range(self.stripes)]
        self._socks = self._connect(host, port, int(deadline_s * 1e3))
        self._threads = [threading.Thread(target=self._plan_loop, name="kv-dp-plan", daemon=True)]
        for i in range(self.stripes):
            self._threads += [threading.Thread(target=self._frame_loop, args=(i,), name="kv-dp-framer", daemon=True),
                              threading.Thread(target=self._send_loop, args=(i,), name="kv-dp-send", daemon=True)]
        self._threads.append(threading.Thread(target=self._reply_loop, name="kv-dp-reply", daemon=True))
        for t in self._threads:
            t.start()

    @property
    def queued_bytes(self) -> int:
        """Payload bytes queued and not yet fully framed (bounded by max_queue_bytes + one payload)."""
        return self._qbytes

    # ------------------------------------------------------------ setup

    def _connect(self, host: str, port: int, deadline_ms: int) -> list[socket.socket]:
        tid = os.urandom(12).hex()
        socks: list[socket.socket] = []
        try:
            for i in range(self.stripes):
                s = socket.create_connection((host, port), timeout=self._client.timeout_s)
                socks.append(s)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
                s.sendall(encode_hello(self._client.auth_token, self.request_id, tid, i, self.stripes,
                                       min(max(1, deadline_ms), MAX_DEADLINE_MS)))
        except OSError as e:
            for s in socks:
                s.close()
            raise TransferUnavailable(f"data plane {host}:{port} unreachable: {e}") from None
        return socks

    # ------------------------------------------------------------ threads

    def _ended(self) -> bool:
        return self._stop.is_set() or self._done.is_set()

    def _put(self, q: queue.Queue, item: object) -> bool:
        """Put into a bounded queue, giving up once the transfer ended; False then."""
        while not self._ended():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _plan_loop(self) -> None:
        """Turn queued payloads into frame specs (no per-byte work) and deal them round robin by
        stream position to the connections' framers."""
        pos = 0
        try:
            while True:
                with self._cv:
                    while not self._q:
                        if self._ended():
                            return
                        self._cv.wait(timeout=_POLL_S)
                    item = self._q.popleft()
                if item is None:
                    break
                if isinstance(item, bytes):  # OPEN or FINISH, prebuilt
                    specs: Iterable[bytes | ChunkSpec] = (item,)
                    cost = len(item)
                else:
                    payload, first_seq, cost = item
                    specs = iter_chunk_specs(self.request_id, payload, self.wire, first_seq, self.chunk_bytes,
                                             self.src_block_size)
                for spec in specs:
                    if not self._put(self._fq[pos % self.stripes], (pos, spec)):
                        return
                    pos += 1
                with self._cv:
                    self._qbytes -= cost
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - a bug must fail the transfer, not hang it
            self._framing_failed(e)
            return
        for fq in self._fq:  # end of stream: the framers and senders return, the connections stay open
            if not self._put(fq, None):
                return

    def _frame_loop(self, i: int) -> None:
        """Connection i's framer: CRC32C (releases the GIL) and header of each of its frames, then
        the envelope; in parallel with the other connections' framers and with sending."""
        fq, out = self._fq[i], self._outq[i]
        try:
            while True:
                try:
                    item = fq.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._ended():
                        return
                    continue
                if item is None:
                    self._put(out, None)
                    return
                pos, spec = item
                parts: Parts = [spec] if isinstance(spec, bytes) else spec.parts()
                n = sum(memoryview(p).nbytes for p in parts)
                parts[0] = ENVELOPE.pack(n, pos) + parts[0]
                if not self._put(out, parts):
                    return
        except BaseException as e:  # noqa: BLE001 - a bug must fail the transfer, not hang it
            self._framing_failed(e)

    def _framing_failed(self, e: BaseException) -> None:
        self._local_error = KVTransferError(f"framing failed: {type(e).__name__}: {e}")
        self._cancel_remote()  # the receiver may not have applied OPEN yet: free its reservation
        self._fail_local(self._local_error)

    def _send_loop(self, i: int) -> None:
        sock, out = self._socks[i], self._outq[i]
        try:
            while True:
                try:
                    parts = out.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._ended():
                        return
                    continue
                if parts is None:
                    return
                send_parts(sock, parts)
        except OSError as e:
            if not self._ended():  # the receiver's reply (on connection 0) usually names the cause
                self._send_error = e
                threading.Thread(target=self._grace, args=(i, e), daemon=True).start()

    def _grace(self, i: int, e: OSError) -> None:
        if not self._done.wait(REPLY_GRACE_S):
            self._local_error = TransferCancelled(
                f"stream {self.request_id!r}: data connection {i} failed ({e}) and the receiver gave no reason")
            self._cancel_remote()
            self._fail_local(self._local_error)

    def _reply_loop(self) -> None:
        sock = self._socks[0]
        try:
            head = bytearray(REPLY_PREFIX.size)
            recv_exactly(sock, memoryview(head))
            (n,) = REPLY_PREFIX.unpack(head)
            if not 0 < n <= MAX_REPLY_BYTES:
                raise FrameError(f"data reply: length {n} outside [1, {MAX_REPLY_BYTES}]")
            body = bytearray(n)
            recv_exactly(sock, memoryview(body))
            result: control.TransferAck | TandemError = decode_reply_body(bytes(body))
        except TandemError as e:
            result = e
        except OSError as e:
            result = TransferCancelled(
                f"stream {self.request_id!r}: the receiver closed the data connection without a reply ({e}): "
                "cancelled by either side, its lease ran out, or it shut down")
        self._settle(result)

    # ------------------------------------------------------------ outcome

    def _settle(self, result: control.TransferAck | TandemError) -> None:
        """Record the first outcome, then stop every thread and close the connections."""
        with self._cv:
            if self._done.is_set():
                return
            self._result = self._local_error or result  # a local failure is the real cause
            self._done.set()
            self._cv.notify_all()
        for s in self._socks:
            shut(s)
        for s in self._socks:
            s.close()

    def _fail_local(self, err: TandemError) -> None:
        self._settle(err)

    def _error(self) -> TandemError:
        r = self._result
        if isinstance(r, TandemError):
            return type(r)(str(r))
        return KVTransferError(f"stream {self.request_id!r}: the receiver answered before the finish frame")

    # ------------------------------------------------------------ KVStream hooks

    def _emit(self, payload: KVLayerPayload, first_seq: int, payload_bytes: int) -> None:
        with self._cv:
            while self._qbytes + payload_bytes > self.max_queue_bytes and self._qbytes > 0:
                if self._done.is_set():
                    raise self._error()
                if time.monotonic() > self.deadline:
                    break
                self._cv.wait(timeout=_POLL_S)
            else:
                if self._done.is_set():
                    raise self._error()
                self._q.append((payload, first_seq, payload_bytes))
                self._qbytes += payload_bytes
                self._cv.notify_all()
                return
        self.abort()
        raise TransferDeadlineExceeded(f"stream {self.request_id!r}: deadline passed while queued")

    def _finish(self, frame: bytes) -> control.TransferAck:
        with self._cv:
            self._q.append(frame)
            self._qbytes += len(frame)
            self._q.append(None)
            self._cv.notify_all()
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            self.abort()
            raise TransferDeadlineExceeded(f"stream {self.request_id!r}: no acknowledgement before the deadline")
        r = self._result
        if isinstance(r, control.TransferAck):
            if r.request_id != self.request_id:
                raise FrameError(f"ack for {r.request_id!r} on the stream of {self.request_id!r}")
            return r
        raise self._error()

    def _cancel_remote(self) -> None:
        """Best-effort Cancel RPC (over gRPC): the receiver records a cancellation (not a lost
        connection) and frees the reservation, even one no frame of ours reached; if it is
        unreachable, its lease frees the blocks."""
        try:
            self._client._cancel(control.encode_cancel(self.request_id), timeout=ABORT_CANCEL_TIMEOUT_S,
                                 metadata=self._client._md)
        except Exception:  # noqa: BLE001 - the peer may be gone; its lease frees the blocks then
            log.debug("cancel of %s did not reach the receiver", self.request_id)

    def abort(self) -> None:
        self.closed = True
        if not self._done.is_set():
            self._cancel_remote()
        self._stop.set()
        self._settle(TransferCancelled(f"stream {self.request_id!r} was aborted"))
        with self._cv:
            self._q.clear()
            self._q.append(None)
            self._cv.notify_all()


__all__ = ["DataPlaneStream"]

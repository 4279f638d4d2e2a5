"""The raw-TCP data plane of protocol 3: PushKV's frames over 1-16 plain TCP connections per transfer.

A gRPC PushKV stream costs ~2.15 CPU-s per GB of KV on the 2-core CI box (HTTP/2 framing, one copy
into a Python `bytes` per message, one message in flight per call: workers/kv_transfer/README.md),
about twice this data plane's cost; raw TCP costs ~0.42. The data
plane carries the *same* frames (OPEN, CHUNK..., FINISH; same CRC32C; same `Session` validation) over
raw sockets instead, striped over `stripes` connections, and is negotiated through the gRPC control
RPCs: the receiver's Health and Handshake replies carry its data port (`dport`, 0 = none). Bytes on a
data connection (docs/wire-format.md, "Data plane"):

    client -> server  hello     ">4sHI" magic b"TKVD", protocol version (u16), hello length (u32,
                                 <= 4096), then a msgpack map {tok, rid, tid, stripe, stripes, dl_ms}
    client -> server  envelopes ">IQ" frame length (u32, 1..max_frame_bytes), stream position (u64),
                                 then the frame; position 0 = OPEN, CHUNK seq s = s + 1, FINISH last
    server -> client  reply     ">I" length (<= 64 KiB), msgpack map {ok: true, ack: PushAck} or
                                 {ok: false, err: ClassName, msg: str}; on stripe 0 (errors: on all)

This module is the receiving side (`DataPlaneServer`, run by KVTransferServer); the codecs both
sides share are in `dataplane_codec.py`, the sending side is `dataplane_client.DataPlaneStream`. Per
transfer the server runs, per connection, a reader thread (`recv_into` a fresh numpy buffer: no copy
after the kernel's) and a checker thread (`verify.decode_checked`: CRC32C and the NaN/Inf scan, fused
in one pass), so receiving frame i+1 overlaps checking frame i and connections are checked in
parallel (all of it releases the GIL); and one verifier thread applying the checked frames to
`Session` in stream order through a `ReorderWindow`. A frame that failed its checks fails the stream
when its position is reached, as on PushKV. The window spans `window_frames` positions (default 2
per connection: one being received, one being checked); a reader whose next frame lies beyond it
stops reading (TCP flow control then stops the sender). A buffer is allocated only once its position
is inside the window, so at most window + 1 frames (the +1: the one being applied) are alive; that
many are charged to the receiver's `max_inflight_bytes` at OPEN. Nothing from the peer is trusted:
token (constant time), sizes, positions (strictly increasing per connection, no duplicates) are
checked before use; any failure ends the whole transfer with a typed error, frees its blocks, and
closes every connection.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import logging
import queue
import socket
import threading
import time
from collections import deque

import numpy as np

from orchestrator.core.types import TandemError
from workers.kv_payload import KVCapacityError
from workers.kv_transfer import control
from workers.kv_transfer.dataplane_codec import (
    ENVELOPE,
    HELLO_MAGIC,
    HELLO_PREFIX,
    HELLO_TIMEOUT_S,
    LINGER_S,
    MAX_HELLO_BYTES,
    MAX_POSITION,
    OPEN_TIMEOUT_S,
    REMEMBER_ENDED,
    VERIFY_POLL_S,
    Hello,
    ReorderWindow,
    _Closed,
    decode_hello_body,
    encode_reply,
    linger_close,
    recv_exactly,
    shut,
)
from workers.kv_transfer.errors import (
    FrameError,
    KVTransferError,
    TransferAuthError,
    TransferCancelled,
    TransferDeadlineExceeded,
)
from workers.kv_transfer.receiver import KVReceiver
from workers.kv_transfer.verify import decode_checked
from workers.kv_transfer.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Frame,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- one incoming transfer


class IncomingState(enum.StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class _Incoming:
    """One striped transfer at the receiver: its connections, window, session and verifier thread."""

    def __init__(self, plane: DataPlaneServer, hello: Hello) -> None:
        self.plane = plane
        self.request_id, self.transfer_id, self.stripes = hello.request_id, hello.transfer_id, hello.stripes
        self.started = time.monotonic()
        self.deadline = self.started + hello.deadline_ms / 1e3
        # default: per connection one frame being checked and one being received (a full pipeline)
        self.window = ReorderWindow(plane.window_frames or 2 * hello.stripes)
        # held at once: a buffer is allocated only after wait_room (position < next + capacity), and
        # only the frame being applied lies below next: at most capacity + 1 frames
        self.session = plane.receiver.begin(frames_held=self.window.capacity + 1)
        self.session.set_abort_hook(self._on_receiver_abort)
        self.socks: dict[int, socket.socket] = {}
        self.state = IncomingState.RUNNING
        self.error: TandemError | None = None
        self.ended = threading.Event()  # set once the reply is sent (or the transfer failed)
        self._lock = threading.Lock()
        self._verifier = threading.Thread(target=self._verify_loop, name="kv-dp-verify", daemon=True)
        self._verifier.start()

    def attach(self, stripe: int, sock: socket.socket) -> None:
        with self._lock:
            if self.state is not IncomingState.RUNNING:
                raise self.error or TransferCancelled(f"transfer {self.transfer_id} already ended")
            if stripe in self.socks:
                raise FrameError(f"stripe {stripe} of transfer {self.transfer_id} connected twice")
            self.socks[stripe] = sock

    # -- the threads
    def read_loop(self, stripe: int, sock: socket.socket) -> None:
        """A connection's reader: envelopes -> fresh buffers -> its checker thread. Ends the transfer
        on error. Receiving and checking run on two threads, so the kernel's copy of frame i+1
        overlaps the CRC32C and value checks of frame i (both release the GIL)."""
        env = bytearray(ENVELOPE.size)
        env_view = memoryview(env)
        last = -1
        max_frame = self.plane.receiver.max_frame_bytes
        checks: queue.SimpleQueue[tuple[int, memoryview] | None] = queue.SimpleQueue()  # <= window frames
        checker = threading.Thread(target=self._check_loop, args=(checks,), name="kv-dp-check", daemon=True)
        checker.start()
        try:
            while True:
                recv_exactly(sock, env_view)
                n, pos = ENVELOPE.unpack(env)
                if not 0 < n <= max_frame:
                    raise FrameError(f"data envelope: frame length {n} outside [1, {max_frame}]")
                if not last < pos <= MAX_POSITION:
                    raise FrameError(f"data envelope: position {pos} after {last} on stripe {stripe} (must increase)")
                last = pos
                self.window.wait_room(pos)
                buf = memoryview(_frame_buffer(n))
                recv_exactly(sock, buf)
                checks.put((pos, buf))
                del buf  # the frame's only references: the queue, then the window, then the verifier
        except _Closed:
            pass
        except TandemError as e:
            self.fail(e)
        except OSError as e:  # EOF, reset: the sender died or its connection was lost
            if self.state is IncomingState.RUNNING:
                self.fail(TransferCancelled(
                    f"transfer {self.request_id!r}: stripe {stripe}'s connection was lost mid-stream ({e})"))
        finally:
            checks.put(None)
            checker.join()
            linger_close(sock)

    def _check_loop(self, checks: queue.SimpleQueue[tuple[int, memoryview] | None]) -> None:
        """A connection's checker: CRC32C and value checks (`decode_checked`), then the window. A frame
        that fails goes into the window as its error: the verifier fails the stream at its position."""
        max_frame = self.plane.receiver.max_frame_bytes
        check_values = self.plane.receiver.check_values
        while (item := checks.get()) is not None:
            pos, buf = item
            del item
            if self.window.closed:
                continue  # the transfer ended: drop what is still queued (the reader stops too)
            try:
                frame: Frame | TandemError = decode_checked(buf, max_frame, check_values)
            except TandemError as e:  # its traceback would keep the buffer alive (the checks' locals)
                frame = e.with_traceback(None)
            except Exception as e:  # pragma: no cover - a bug must fail the transfer, not stall it
                log.exception("data plane checker failed")
                frame = KVTransferError(f"checking a frame failed: {type(e).__name__}: {e}")
            del buf
            try:
                self.window.put(pos, frame)
            except _Closed:
                pass  # the transfer ended: drop what is still queued (the reader stops too)
            except TandemError as e:  # a duplicate position
                self.fail(e)

    def _verify_loop(self) -> None:
        """Feeds the session in stream order; sends the reply; the only thread touching the session."""
        try:
            while True:
                try:
                    frame = self.window.pop(VERIFY_POLL_S)
                except _Closed:
                    break
                if frame is None:
                    now = time.monotonic()
                    if now > self.deadline:
                        self.fail(TransferDeadlineExceeded(
                            f"transfer {self.request_id!r}: the deadline passed before it finished"))
                    elif self.session.open is None and now > self.started + OPEN_TIMEOUT_S:
                        self.fail(TransferDeadlineExceeded(
                            f"transfer {self.request_id!r}: no OPEN frame within {OPEN_TIMEOUT_S:g} s"))
                    continue
                try:
                    ack = self.session.feed_frame(frame)
                except TandemError as e:  # feed_frame already released the blocks
                    self.fail(e)
                    break
                del frame
                if ack is not None:
                    self._complete(ack)
                    return
        except Exception as e:  # pragma: no cover - never leak blocks on a bug
            log.exception("data plane verifier failed")
            self.fail(KVTransferError(f"{type(e).__name__}: {e}"))
        self.session.abort(self.error or TransferCancelled("transfer ended"))  # no-op if already done
        self.plane._forget(self)

    # -- endings
    def _complete(self, ack: control.TransferAck) -> None:
        with self._lock:
            if self.state is not IncomingState.RUNNING:
                return
            self.state = IncomingState.COMPLETE
            socks = dict(self.socks)
        self.window.close()
        reply = encode_reply(ack)
        sock0 = socks.get(0)
        if sock0 is not None:
            try:
                sock0.sendall(reply)
            except OSError:
                log.debug("ack of %s could not be sent", self.request_id)
        self._close_all(socks)
        self.plane._forget(self)

    def _close_all(self, socks: dict[int, socket.socket]) -> None:
        """After the reply: half-close (the peer reads the reply, then EOF); readers drain until the
        peer closes (linger_close); a peer that never does is cut after LINGER_S."""
        self.ended.set()
        for s in socks.values():
            shut(s, socket.SHUT_WR)
        timer = threading.Timer(LINGER_S, lambda: [shut(s) for s in socks.values()])
        timer.daemon = True
        timer.start()

    def fail(self, err: TandemError) -> None:
        """End the transfer with `err`: the verifier releases the blocks; every connection is told and closed."""
        with self._lock:
            if self.state is not IncomingState.RUNNING:
                return
            self.state, self.error = IncomingState.FAILED, err
            socks = dict(self.socks)
        self.window.close()
        reply = encode_reply(err)
        for s in socks.values():
            with contextlib.suppress(OSError):  # a small reply into an idle send buffer: never blocks
                s.send(reply, socket.MSG_DONTWAIT)
        self._close_all(socks)

    def _on_receiver_abort(self) -> None:
        """The receiver failed the reservation (cancel, lease expiry, shutdown): end the connections."""
        res = self.session.res
        self.fail((res.error if res is not None else None) or TransferCancelled("transfer cancelled by the receiver"))


# ---------------------------------------------------------------- the listener


class DataPlaneServer:
    """Accepts data connections for `receiver` on host:port (see the module docstring)."""

    def __init__(
        self,
        receiver: KVReceiver,
        token: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = 256,
        window_frames: int = 0,
    ) -> None:
        self.receiver = receiver
        self._token = token
        self.host, self.port = host, int(port)
        self.max_connections = int(max_connections)
        self.window_frames = int(window_frames)  # 0: 2 per connection
        self.max_frame_bytes = getattr(receiver, "max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
        self._lock = threading.Lock()
        self._transfers: dict[str, _Incoming] = {}
        self._ended: deque[str] = deque(maxlen=REMEMBER_ENDED)
        # ended transfer id -> (error class, message) or None when it completed; no traceback kept
        self._ended_err: dict[str, tuple[type[TandemError], str] | None] = {}
        self._connections = 0
        self.connections_accepted = 0  # authenticated connections joined to a transfer, ever
        self._lsock: socket.socket | None = None
        self._stopped = False

    def start(self) -> int:
        lsock = socket.create_server((self.host, self.port), backlog=128)
        self._lsock, self.port = lsock, lsock.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="kv-dp-accept", daemon=True).start()
        return self.port

    def stop(self) -> None:
        """Stop accepting; end every transfer still running (TransferCancelled, blocks freed)."""
        with self._lock:
            self._stopped = True
            live = list(self._transfers.values())
        if self._lsock is not None:
            shut(self._lsock)
            self._lsock.close()
        for inc in live:
            inc.fail(TransferCancelled("transfer cancelled: receiver shutting down"))

    def active(self) -> int:
        with self._lock:
            return len(self._transfers)

    def _accept_loop(self) -> None:
        lsock = self._lsock
        assert lsock is not None
        while not self._stopped:
            try:
                conn, _addr = lsock.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                over = self._connections >= self.max_connections
                if not over:
                    self._connections += 1
            if over:
                _refuse(conn, KVCapacityError(f"data plane: {self.max_connections} connections open; retry later"))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kv-dp-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                hello = self._read_hello(conn)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                inc = self._join(hello, conn)
            except (TandemError, OSError) as e:
                _refuse(conn, e if isinstance(e, TandemError) else FrameError(f"data hello failed: {e}"))
                return
            inc.read_loop(hello.stripe, conn)
        finally:
            with self._lock:
                self._connections -= 1

    def _read_hello(self, conn: socket.socket) -> Hello:
        conn.settimeout(HELLO_TIMEOUT_S)
        head = bytearray(HELLO_PREFIX.size)
        recv_exactly(conn, memoryview(head))
        magic, version, n = HELLO_PREFIX.unpack(head)
        if magic != HELLO_MAGIC:
            raise FrameError(f"data hello: bad magic {bytes(magic)!r}")
        if version != PROTOCOL_VERSION:
            raise FrameError(f"data hello: protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})")
        if not 0 < n <= MAX_HELLO_BYTES:
            raise FrameError(f"data hello: length {n} outside [1, {MAX_HELLO_BYTES}]")
        body = bytearray(n)
        recv_exactly(conn, memoryview(body))
        conn.settimeout(None)
        hello = decode_hello_body(bytes(body))
        if not hmac.compare_digest(hello.token.encode(), self._token):
            raise TransferAuthError("missing or wrong KV channel token")
        return hello

    def _join(self, hello: Hello, conn: socket.socket) -> _Incoming:
        with self._lock:
            if self._stopped:
                raise TransferCancelled("the receiver is shutting down")
            if hello.transfer_id in self._ended_err:  # a stripe joining late: tell it why it ended
                ended = self._ended_err[hello.transfer_id]
                if ended is not None:
                    raise ended[0](f"transfer {hello.transfer_id} already ended: {ended[1]}")
                raise TransferCancelled(f"transfer {hello.transfer_id} already ended")
            inc = self._transfers.get(hello.transfer_id)
            if inc is None:
                inc = _Incoming(self, hello)
                self._transfers[hello.transfer_id] = inc
            elif (inc.request_id, inc.stripes) != (hello.request_id, hello.stripes):
                raise FrameError(f"data hello: transfer {hello.transfer_id} is request {inc.request_id!r} "
                                 f"over {inc.stripes} stripes, not {hello.request_id!r} over {hello.stripes}")
        inc.attach(hello.stripe, conn)
        with self._lock:
            self.connections_accepted += 1
        return inc

    def _forget(self, inc: _Incoming) -> None:
        with self._lock:
            if self._transfers.get(inc.transfer_id) is inc:
                del self._transfers[inc.transfer_id]
                if len(self._ended) == self._ended.maxlen:
                    self._ended_err.pop(self._ended[0], None)
                self._ended.append(inc.transfer_id)
                err = inc.error
                self._ended_err[inc.transfer_id] = None if err is None else (type(err), str(err))


def _frame_buffer(n: int) -> np.ndarray:
    """A received frame's memory: uninitialised (the kernel fills it), fresh per frame and freed once
    the frame is applied. Not pooled: glibc reuses these blocks without page faults once
    memory.tune_malloc_for_streaming() ran (measured: a pool saved nothing, README), and a fresh buffer
    can never be overwritten while a sink still views it."""
    return np.empty(n, dtype=np.uint8)


def _refuse(conn: socket.socket, err: TandemError) -> None:
    """Tell a connection why it is refused (best effort) and close it."""
    with contextlib.suppress(OSError):
        conn.send(encode_reply(err), socket.MSG_DONTWAIT)
    shut(conn, socket.SHUT_WR)
    linger_close(conn)

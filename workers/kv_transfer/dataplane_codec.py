"""Bytes of protocol 3's data plane shared by both ends (dataplane.py: the receiver; dataplane_client.py:
the sender): the connection hello, the frame envelope, the reply, socket helpers and the
`ReorderWindow` that puts frames from several connections back in stream order. The layout is
specified in docs/wire-format.md ("Data plane")."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

from orchestrator.core.types import TandemError
from workers.kv_transfer import control
from workers.kv_transfer.errors import FrameError, TransferAuthError, error_from_name
from workers.kv_transfer.wire import (
    MAX_REQUEST_ID_CHARS,
    PROTOCOL_VERSION,
    Frame,
    get_int,
    get_str,
    unpack_map,
)

HELLO_MAGIC = b"TKVD"
HELLO_PREFIX = struct.Struct(">4sHI")
MAX_HELLO_BYTES = 4096
ENVELOPE = struct.Struct(">IQ")
REPLY_PREFIX = struct.Struct(">I")
MAX_REPLY_BYTES = 64 * 1024
MAX_STRIPES = 16
MAX_POSITION = 1 << 40
MAX_DEADLINE_MS = 24 * 3600 * 1000
HELLO_TIMEOUT_S = 5.0  # a connection that does not say hello in time is dropped
OPEN_TIMEOUT_S = 30.0  # a transfer whose OPEN frame is not applied by then ends (no lease covers it yet)
VERIFY_POLL_S = 0.1  # the verifier's wake-up period (deadline checks)
REMEMBER_ENDED = 4096  # ended transfer ids kept to refuse late connections
LINGER_S = 2.0  # after the reply: how long a connection is drained before it is cut


_WAITALL = getattr(socket, "MSG_WAITALL", 0)


class _Closed(Exception):
    """Internal: the transfer ended while a thread waited (its error is on the transfer)."""


@dataclass(frozen=True)
class Hello:
    token: str
    request_id: str
    transfer_id: str
    stripe: int
    stripes: int
    deadline_ms: int


def encode_hello(token: str, request_id: str, transfer_id: str, stripe: int, stripes: int, deadline_ms: int) -> bytes:
    body = control.pack({"tok": token, "rid": request_id, "tid": transfer_id, "stripe": stripe,
                         "stripes": stripes, "dl_ms": int(deadline_ms)})
    return HELLO_PREFIX.pack(HELLO_MAGIC, PROTOCOL_VERSION, len(body)) + body


def decode_hello_body(body: bytes) -> Hello:
    h = unpack_map(body, "data hello", MAX_HELLO_BYTES)
    stripes = get_int(h, "stripes", 1, MAX_STRIPES, "data hello")
    tok = h.get("tok")
    if not isinstance(tok, str) or len(tok) > 1024:
        raise TransferAuthError("missing or wrong KV channel token")
    return Hello(
        token=tok,
        request_id=get_str(h, "rid", MAX_REQUEST_ID_CHARS, "data hello"),
        transfer_id=get_str(h, "tid", 64, "data hello"),
        stripe=get_int(h, "stripe", 0, stripes - 1, "data hello"),
        stripes=stripes,
        deadline_ms=get_int(h, "dl_ms", 1, MAX_DEADLINE_MS, "data hello"),
    )


def encode_reply(result: control.TransferAck | TandemError) -> bytes:
    if isinstance(result, control.TransferAck):
        body = control.pack({"ok": True, "ack": control.unpack_map(control.encode_ack(result), "ack")})
    else:
        body = control.pack({"ok": False, "err": type(result).__name__, "msg": str(result)[:4000]})
    return REPLY_PREFIX.pack(len(body)) + body


def decode_reply_body(body: bytes) -> control.TransferAck | TandemError:
    """The receiver's verdict: its ack, or the typed error it named (FrameError if malformed)."""
    h = unpack_map(body, "data reply", MAX_REPLY_BYTES)
    ok = h.get("ok")
    if ok is True:
        return control.decode_ack(control.pack(h.get("ack")))
    if ok is False:
        return error_from_name(get_str(h, "err", 128, "data reply"), str(h.get("msg", ""))[:4000])
    raise FrameError("data reply: 'ok' must be a boolean")


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; ConnectionError on EOF (shutdown by another thread reads as EOF).
    MSG_WAITALL: the kernel fills the whole view in one call (no Python loop per TCP segment)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, _WAITALL)
        if k == 0:
            raise ConnectionError("the peer closed the data connection")
        got += k


def send_parts(sock: socket.socket, parts: list) -> None:
    """Write every part (bytes or memoryviews) in order, one `sendmsg` (scatter-gather) per call
    instead of one `sendall` per part: no join, fewer system calls and no tiny segment for the header
    under TCP_NODELAY. Handles partial writes; OSError when the connection fails."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def shut(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Wake every thread blocked on `sock` (their recv returns EOF, send fails); idempotent."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def linger_close(sock: socket.socket, timeout_s: float = LINGER_S) -> None:
    """Close after reading (and dropping) what the peer still sends, until its EOF or timeout_s.

    Closing a socket with unread received data makes the kernel send a reset, which can destroy the
    reply the peer has not read yet; draining first lets the reply (already sent) arrive intact."""
    try:
        sock.settimeout(timeout_s)
        scratch = bytearray(1 << 16)
        end = time.monotonic() + timeout_s
        while sock.recv_into(scratch) and time.monotonic() < end:
            pass
    except OSError:
        pass
    finally:
        sock.close()


class ReorderWindow:
    """Frames from several connections handed back in stream order; at most `capacity` held.

    Readers call `wait_room(pos)` before allocating a frame's buffer (blocks while pos is beyond the
    window), then `put(pos, frame)`; the verifier calls `pop`. `close()` wakes everyone with _Closed.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.next_pos = 0
        self._slots: dict[int, Frame | TandemError] = {}
        self._cv = threading.Condition()
        self.closed = False

    def _check_new(self, pos: int) -> None:
        if self.closed:
            raise _Closed
        if pos < self.next_pos or pos in self._slots:
            raise FrameError(f"duplicate frame at stream position {pos}")

    def wait_room(self, pos: int) -> None:
        with self._cv:
            while not self.closed and pos >= self.next_pos + self.capacity:
                self._cv.wait()
            self._check_new(pos)

    def put(self, pos: int, frame: Frame | TandemError) -> None:
        with self._cv:
            self._check_new(pos)
            self._slots[pos] = frame
            self._cv.notify_all()

    def pop(self, timeout_s: float) -> Frame | TandemError | None:
        """The frame at the next position, or None if it did not arrive within timeout_s."""
        with self._cv:
            if self.next_pos not in self._slots and not self.closed:
                self._cv.wait(timeout_s)
            if self.closed:
                raise _Closed
            frame = self._slots.pop(self.next_pos, None)
            if frame is not None:
                self.next_pos += 1
                self._cv.notify_all()
            return frame

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._slots.clear()
            self._cv.notify_all()



"""Typed errors of the KV transfer (all subclass `TandemError`).

Every failure a peer can cause ends in one of these, on both ends: the server maps each to a gRPC
status plus a `tandem-error` trailing-metadata entry naming the class, and the client re-raises the
same class (see `STATUS_OF` and `error_from_name`). `KVLayoutMismatch`, `KVCapacityError` and
`KVImportError` come from `workers.kv_payload` and are re-exported here.
"""

from __future__ import annotations

from orchestrator.core.types import TandemError
from workers.kv_payload import KVCapacityError, KVImportError, KVLayoutMismatch


class KVTransferError(TandemError):
    """Base of the transfer's own errors."""


class TransferAuthError(KVTransferError):
    """The shared token was missing or wrong (gRPC UNAUTHENTICATED)."""


class FrameError(KVTransferError):
    """A frame from the peer was malformed: bad magic or version, undecodable header, a size, count
    or offset out of range, a truncated stream, a duplicate or out-of-order chunk."""


class ChecksumError(FrameError):
    """A chunk's payload does not match the checksum in its header."""


class TransferDeadlineExceeded(KVTransferError):
    """The transfer did not finish before its deadline."""


class TransferCancelled(KVTransferError):
    """Either side cancelled the transfer (or the receiver shut down)."""


class LeaseExpired(KVTransferError):
    """The receiver's reservation lease ran out before the transfer completed; its blocks are freed."""


class UnknownTransfer(KVTransferError):
    """No reservation exists for this request id at the receiver (reserve before streaming)."""


class TransferUnavailable(KVTransferError):
    """The peer could not be reached or closed the connection."""


# name -> class, for errors that cross the wire by name (never by pickling).
_BY_NAME: dict[str, type[TandemError]] = {
    cls.__name__: cls
    for cls in (
        KVTransferError,
        TransferAuthError,
        FrameError,
        ChecksumError,
        TransferDeadlineExceeded,
        TransferCancelled,
        LeaseExpired,
        UnknownTransfer,
        TransferUnavailable,
        KVLayoutMismatch,
        KVCapacityError,
        KVImportError,
    )
}


def error_from_name(name: str, message: str) -> TandemError:
    """Rebuild a typed error from the name the peer sent; unknown names become KVTransferError."""
    cls = _BY_NAME.get(name, KVTransferError)
    return cls(message)


__all__ = [
    "ChecksumError",
    "FrameError",
    "KVCapacityError",
    "KVImportError",
    "KVLayoutMismatch",
    "KVTransferError",
    "LeaseExpired",
    "TransferAuthError",
    "TransferCancelled",
    "TransferDeadlineExceeded",
    "TransferUnavailable",
    "UnknownTransfer",
    "error_from_name",
]

"""Process-wide allocator tuning for streaming KV frames (glibc only).

Every frame is a fresh multi-MiB `bytes` on both ends (the sender's join, gRPC's copy into Python on
the receiver). With glibc's defaults such blocks are mmap'd or trimmed back to the OS when freed,
so each new frame page-faults its memory in again: measured on the CI box, copying a 2 MiB frame into
fresh memory ran at ~2 GB/s instead of ~8 GB/s, and the receiver's CPU per GB of KV fell from
1.5-1.95 s to 1.17-1.26 s with the thresholds below (workers/kv_transfer/README.md).

`tune_malloc_for_streaming()` raises glibc's mmap threshold (blocks below it come from the heap and
are reused) and its trim threshold (freed heap is kept up to that size instead of being returned).
Cost: a process may keep up to `trim_threshold_bytes` of freed memory. Idempotent; a no-op returning
False where the C library is not glibc. KVTransferServer and KVTransferClient call it unless built
with `tune_malloc=False`; a decode/prefill worker may also call it once at start.
"""

from __future__ import annotations

import ctypes
import platform
import threading

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024 + 128 * 1024  # above the largest frame (64 MiB + header)
DEFAULT_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

_lock = threading.Lock()
_applied: tuple[int, int] | None = None


def tune_malloc_for_streaming(
    mmap_threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES,
    trim_threshold_bytes: int = DEFAULT_TRIM_THRESHOLD_BYTES,
) -> bool:
    """Set glibc's mmap and trim thresholds for this process; True when they are in effect."""
    global _applied
    if mmap_threshold_bytes <= 0 or trim_threshold_bytes <= 0:
        raise ValueError("thresholds must be positive byte counts")
    with _lock:
        if _applied == (mmap_threshold_bytes, trim_threshold_bytes):
            return True
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # glibc caps the mmap threshold at HEAP_MAX/2 (32 MiB on 64-bit) and refuses larger values
        ok_mmap = mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
        if not ok_mmap:
            ok_mmap = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        ok_trim = mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1
        if ok_mmap and ok_trim:
            _applied = (mmap_threshold_bytes, trim_threshold_bytes)
        return ok_mmap and ok_trim

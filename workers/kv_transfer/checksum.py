"""CRC32C (Castagnoli), the payload checksum of protocols 2 and 3.

`crc32c(data, value=0) -> int` returns the CRC32C of `data` continuing from `value` (so a frame's
sections can be checksummed one after another without joining them). Backends, in order:

1. the `crc32c` package (SSE4.2 / ARMv8 CRC instructions; ~10 GB/s on the CI box; releases the GIL
   on large buffers, so framing on one thread overlaps gRPC I/O and receiving on others);
2. `google_crc32c` (same algorithm, C extension);
3. a pure-Python table fallback (~MB/s): correct but far too slow for real transfers. It exists so
   the package still imports where neither extension is installed; `BACKEND` says which one runs.

Check value (RFC 3720, iSCSI): crc32c(b"123456789") == 0xE3069283.
"""

from __future__ import annotations

from typing import Final

Buffer = bytes | bytearray | memoryview


def _make_table() -> list[int]:
    poly = 0x82F63B78  # reflected Castagnoli polynomial
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: Final = _make_table()


def crc32c_pure(data: Buffer, value: int = 0) -> int:
    """Pure-Python CRC32C (the fallback; also the reference the tests compare the fast one with)."""
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in memoryview(data).cast("B"):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    import crc32c as _crc32c_pkg

    def crc32c(data: Buffer, value: int = 0) -> int:
        """CRC32C of `data` continuing from `value` (hardware-accelerated)."""
        return _crc32c_pkg.crc32c(data, value)

    BACKEND = "crc32c" + ("" if _crc32c_pkg.hardware_based else " (software)")
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import google_crc32c as _google

        def crc32c(data: Buffer, value: int = 0) -> int:
            """CRC32C of `data` continuing from `value` (google_crc32c C extension)."""
            return _google.extend(value, bytes(data) if not isinstance(data, bytes) else data)

        BACKEND = "google_crc32c"
    except ImportError:
        crc32c = crc32c_pure
        BACKEND = "pure-python"

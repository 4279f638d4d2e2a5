"""Everything one received frame can be checked for on its own: sizes, CRC32C, value checks.

`decode_checked(data)` = `wire.decode_frame` (prefix, header, sizes, counts, offsets) + for a CHUNK
frame the per-byte checks, in this order of precedence (the first failing one is raised):

1. the payload's CRC32C against the header's `crc` -> ChecksumError;
2. section sizes are whole elements of the chunk's dtype (K, V) and of float32 (scales) -> FrameError;
3. scales finite and >= 0 -> FrameError;
4. (check_values) no NaN/Inf encoding anywhere in K and V -> FrameError.

The two per-byte passes (CRC32C over every payload byte, the NaN/Inf scan over every K/V byte) run
fused, slice by slice (`VERIFY_SLICE_BYTES`, well inside a core's L2): the CRC pulls a slice into
cache and the value scan reads it from there instead of from L3/DRAM a second time. Both release
the GIL (crc32c above 32 KiB, numpy's reductions), so frames checked on different threads (the data
plane: one checker per connection) are checked in parallel.

Stateless: a transport may run it on any thread. Stream checks (order, layer/token ranges, totals)
are the receiver's `Session` (receiver.py).
"""

from __future__ import annotations

import numpy as np

from workers.kv_transfer.checksum import crc32c
from workers.kv_transfer.errors import ChecksumError, FrameError
from workers.kv_transfer.fp8 import WireDtype, has_nonfinite_bytes
from workers.kv_transfer.wire import ChunkFrame, Frame, decode_frame

VERIFY_SLICE_BYTES = 512 * 1024  # measured: 512 KiB slices beat 64-256 KiB and 1 MiB here (README)


def scan_payload(payload: memoryview, kv_bytes: int, wire: WireDtype, check_values: bool,
                 slice_bytes: int | None = None) -> tuple[int, bool]:
    """One pass over `payload` in slices of slice_bytes (default VERIFY_SLICE_BYTES): (CRC32C of all
    of it, whether its first `kv_bytes` bytes hold a NaN/Inf encoding of `wire`; False when not
    check_values). kv_bytes must be a multiple of wire's element size (slices are, being even)."""
    slice_bytes = VERIFY_SLICE_BYTES if slice_bytes is None else slice_bytes
    if slice_bytes <= 0 or slice_bytes % 2:
        raise ValueError(f"slice_bytes must be a positive even number, got {slice_bytes}")
    crc, bad, n = 0, False, len(payload)
    for a in range(0, n, slice_bytes):
        b = min(n, a + slice_bytes)
        crc = crc32c(payload[a:b], crc)
        if check_values and not bad and a < kv_bytes:
            bad = has_nonfinite_bytes(payload[a : min(b, kv_bytes)], wire)
    return crc, bad


_MAX_POSITIVE_FINITE_F32_BITS = 0x7F7FFFFF  # +0.0 .. FLT_MAX: the bit patterns of finite x >= +0


def scales_ok(buf: memoryview) -> bool:
    """True when every little-endian float32 in `buf` is finite and >= 0 (-0.0 included). Usually
    one max-reduction over the bits; the exact float test only when that one fails (numpy: torch's
    tiny CPU ops cost ms each on a loaded box)."""
    if len(buf) == 0:
        return True
    if int(np.frombuffer(buf, dtype="<u4").max()) <= _MAX_POSITIVE_FINITE_F32_BITS:
        return True
    arr = np.frombuffer(buf, dtype="<f4")
    return bool(np.isfinite(arr).all() and (arr >= 0).all())


def check_chunk(c: ChunkFrame, check_values: bool = True) -> None:
    """The per-byte checks of a chunk decoded with `payload_crc=False` (module docstring, 1-4)."""
    wire = c.wire_dtype
    k_len, v_len, ks_len, vs_len = c.lengths
    whole = not (k_len % wire.bytes_per_element or v_len % wire.bytes_per_element or ks_len % 4 or vs_len % 4)
    kv_bytes = k_len + v_len
    crc, bad = scan_payload(c.payload, kv_bytes, wire, check_values and whole)
    if crc != c.checksum:
        raise ChecksumError(f"chunk of {c.request_id!r} layer {c.layer_start} tokens "
                            f"[{c.token_start}, {c.token_end}): checksum mismatch")
    if not whole:
        raise FrameError(f"chunk section sizes {list(c.lengths)} are not whole {wire.value} / float32 elements")
    for i in (2, 3):
        if not scales_ok(c.section(i)):
            raise FrameError(f"layer {c.layer_start}: scales must be finite and >= 0")
    if bad:
        raise FrameError(f"layer {c.layer_start}: KV holds NaN/Inf encodings of {wire.value}")


def decode_checked(data: bytes | memoryview, max_frame_bytes: int, check_values: bool = True) -> Frame:
    """decode_frame + check_chunk: everything one frame can be checked for alone (module docstring)."""
    frame = decode_frame(data, max_frame_bytes, payload_crc=False)
    if isinstance(frame, ChunkFrame):
        check_chunk(frame, check_values)
    return frame

"""The sending side: turn KVLayerPayloads into frames. Shared by the gRPC and in-process streams.

`KVStream` is what `open_stream` returns. Its contract (the engine's `on_layer` callback calls
`send_layer`):

- `send_layer(payload)` validates the payload against the stream's layout, transcodes it to the
  wire variant and hands it to the transport, which frames it lazily (one frame in memory at a
  time). It returns once the payload is queued; it blocks while the transport's queue (bounded in
  bytes) is full (flow control) and raises the transfer's typed error if the receiver has already
  failed the transfer. The payload's tensors are referenced until sent: do not modify them.
- `finish(first_token_id)` sends the FINISH frame and waits for the receiver's `TransferAck`.
- `abort()` cancels the transfer; the receiver frees its blocks. Idempotent.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVImportError, KVLayerPayload, KVLayout
from workers.kv_transfer.control import TransferAck
from workers.kv_transfer.errors import FrameError
from workers.kv_transfer.fp8 import WireDtype, transcode, wire_dtype_of
from workers.kv_transfer.wire import PROTOCOL_VERSION, chunk_parts, encode_finish, encode_open

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def chunk_plan(payload: KVLayerPayload, wire: WireDtype, chunk_bytes: int) -> tuple[int, int, int]:
    """(tokens per chunk, number of chunks, payload bytes) of one layer payload in `wire`."""
    n, h, d = (int(x) for x in payload.k.shape)
    per_tok = 2 * h * d * wire.bytes_per_element + (2 * h * 4 if wire.is_fp8 else 0)
    step = max(1, chunk_bytes // per_tok)
    return step, -(-n // step), n * per_tok


def iter_frames(
    request_id: str,
    payload: KVLayerPayload,
    wire: WireDtype,
    first_seq: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    src_block_size: int = 0,
) -> Iterator[bytes]:
    """CHUNK frames of one layer payload already in `wire`'s dtype, split by tokens into ~chunk_bytes.

    Lazy: one frame exists at a time (fresh memory costs page faults; recycled memory does not).
    """
    for parts in iter_frame_parts(request_id, payload, wire, first_seq, chunk_bytes, src_block_size):
        yield b"".join(parts)


def iter_frame_parts(
    request_id: str,
    payload: KVLayerPayload,
    wire: WireDtype,
    first_seq: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    src_block_size: int = 0,
) -> Iterator[list[memoryview | bytes]]:
    """The frames of `iter_frames`, each as [prefix + header, *sections] (`wire.chunk_parts`): the
    sections view the payload's memory, nothing is copied."""
    for spec in iter_chunk_specs(request_id, payload, wire, first_seq, chunk_bytes, src_block_size):
        yield spec.parts()


@dataclass(frozen=True)
class ChunkSpec:
    """One CHUNK frame before its checksum: what `chunk_parts` needs. `parts()` computes the CRC32C
    and the header (the per-byte work), so a transport can plan frames on one thread and checksum
    them on others (the data plane: one framer per connection)."""

    request_id: str
    seq: int
    layer: int
    token_start: int
    token_end: int
    wire: WireDtype
    sections: list[memoryview]  # [k, v, k_scale, v_scale], views of the payload's memory
    end_of_payload: bool
    src_block_size: int

    def parts(self) -> list[memoryview | bytes]:
        return chunk_parts(self.request_id, self.seq, self.layer, self.token_start, self.token_end, self.wire,
                           self.sections, end_of_payload=self.end_of_payload, src_block_size=self.src_block_size)


def iter_chunk_specs(
    request_id: str,
    payload: KVLayerPayload,
    wire: WireDtype,
    first_seq: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    src_block_size: int = 0,
) -> Iterator[ChunkSpec]:
    """The CHUNK frames of one layer payload (already in `wire`'s dtype) split by tokens into
    ~chunk_bytes, unchecksummed (see ChunkSpec); cheap: no per-byte work."""
    n, h, d = (int(x) for x in payload.k.shape)
    tok_bytes = h * d * wire.bytes_per_element
    scale_tok_bytes = h * 4 if wire.is_fp8 else 0
    step, _, _ = chunk_plan(payload, wire, chunk_bytes)
    k, v = _bytes_view(payload.k), _bytes_view(payload.v)
    ks = _bytes_view(payload.k_scale.to(torch.float32)) if wire.is_fp8 else memoryview(b"")
    vs = _bytes_view(payload.v_scale.to(torch.float32)) if wire.is_fp8 else memoryview(b"")
    for i, a in enumerate(range(0, n, step)):
        b = min(n, a + step)
        sections = [
            k[a * tok_bytes : b * tok_bytes],
            v[a * tok_bytes : b * tok_bytes],
            ks[a * scale_tok_bytes : b * scale_tok_bytes],
            vs[a * scale_tok_bytes : b * scale_tok_bytes],
        ]
        yield ChunkSpec(request_id, first_seq + i, payload.layer, payload.token_start + a, payload.token_start + b,
                        wire, sections, b == n, src_block_size)


def encode_payload(
    request_id: str,
    payload: KVLayerPayload,
    wire: WireDtype,
    first_seq: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    src_block_size: int = 0,
) -> list[bytes]:
    """All CHUNK frames of one layer payload (see iter_frames)."""
    return list(iter_frames(request_id, payload, wire, first_seq, chunk_bytes, src_block_size))


class KVStream(abc.ABC):
    """One outgoing transfer (see the module docstring for the contract)."""

    def __init__(
        self,
        request_id: str,
        layout: KVLayout,
        kv_dtype: KVDtype,
        prompt_token_ids: Sequence[int],
        *,
        wire_dtype: WireDtype | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        src_block_size: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise KVImportError("prompt_token_ids must not be empty")
        if chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes must be >= 1024, got {chunk_bytes}")
        self.request_id = request_id
        self.layout = layout
        self.kv_dtype = KVDtype(kv_dtype)
        self.src_wire = wire_dtype_of(self.kv_dtype)
        self.wire = WireDtype(wire_dtype) if wire_dtype is not None else self.src_wire
        self.num_tokens = len(prompt_token_ids)
        self.chunk_bytes = int(chunk_bytes)
        self.src_block_size = int(src_block_size)
        self.seq = 0
        self.payload_bytes = 0
        self.closed = False
        self._open_frame = encode_open(
            request_id, layout.compat_hash(PROTOCOL_VERSION), self.wire, self.num_tokens, layout.num_layers,
            layout.num_kv_heads, layout.head_dim, list(prompt_token_ids), src_block_size,
        )

    # -- transport hooks
    @abc.abstractmethod
    def _emit(self, payload: KVLayerPayload, first_seq: int, payload_bytes: int) -> None:
        """Hand a payload (already in the wire dtype) to the transport, which frames it from first_seq.

        May block for flow control; raises the transfer's typed error if it has already failed.
        """

    @abc.abstractmethod
    def _finish(self, frame: bytes) -> TransferAck:
        """Send the final frame and wait for the acknowledgement."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Cancel the transfer; the receiver frees the reservation. Idempotent."""

    def frames_of(self, payload: KVLayerPayload, first_seq: int) -> Iterator[bytes]:
        return iter_frames(self.request_id, payload, self.wire, first_seq, self.chunk_bytes, self.src_block_size)

    # -- public
    def send_layer(self, payload: KVLayerPayload) -> None:
        """Queue one layer's KV (any token range not yet sent) for sending.

        The payload's tensors are referenced, not copied, until their frames are sent: do not
        modify them in place afterwards (the engine's exported tensors are never modified).
        """
        if self.closed:
            raise FrameError(f"stream {self.request_id!r} is closed")
        self._check(payload)
        wire_payload = transcode(payload, self.src_wire, self.wire)
        _, num_chunks, nbytes = chunk_plan(wire_payload, self.wire, self.chunk_bytes)
        first_seq = self.seq
        self.seq += num_chunks
        self.payload_bytes += nbytes
        self._emit(wire_payload, first_seq, nbytes)

    def finish(self, first_token_id: int) -> TransferAck:
        """Close the stream and wait for the receiver to verify and write everything."""
        if self.closed:
            raise FrameError(f"stream {self.request_id!r} is closed")
        if not isinstance(first_token_id, int) or first_token_id < 0:
            raise KVImportError(f"first_token_id must be a non-negative int, got {first_token_id!r}")
        self.closed = True
        return self._finish(encode_finish(self.request_id, self.seq, first_token_id, self.seq, self.payload_bytes))

    def _check(self, p: KVLayerPayload) -> None:
        lay = self.layout
        want = self.src_wire.torch_dtype
        shape = (p.num_tokens, lay.num_kv_heads, lay.head_dim)
        if tuple(p.k.shape) != shape or tuple(p.v.shape) != shape:
            raise KVImportError(f"layer {p.layer}: k/v shapes {tuple(p.k.shape)}/{tuple(p.v.shape)} != {shape}")
        if p.k.dtype != want or p.v.dtype != want:
            raise KVImportError(f"layer {p.layer}: k/v dtype {p.k.dtype} != {want} ({self.kv_dtype.value})")
        if self.src_wire.is_fp8 and (p.k_scale is None or p.v_scale is None):
            raise KVImportError(f"layer {p.layer}: fp8 KV needs k_scale and v_scale")
        if self.src_wire.is_fp8 and (tuple(p.k_scale.shape) != shape[:2] or tuple(p.v_scale.shape) != shape[:2]):
            raise KVImportError(f"layer {p.layer}: scales must be {shape[:2]}")
        if not 0 <= p.layer < lay.num_layers:
            raise KVImportError(f"layer {p.layer} outside [0, {lay.num_layers})")
        if p.num_tokens < 1 or not 0 <= p.token_start <= self.num_tokens - p.num_tokens:
            raise KVImportError(f"tokens [{p.token_start}, {p.token_start + p.num_tokens}) outside the prompt")

"""Test doubles at the transport's seam: a paged fake KVSink with a leak check, and factories."""

from __future__ import annotations

import math
import threading

import torch

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVCapacityError, KVImportError, KVLayerPayload, KVLayout
from workers.kv_transfer.fp8 import WireDtype, dequantize, quantize, wire_dtype_of

TOKEN = "test-token-0123456789"


def make_layout(**over) -> KVLayout:
    base = dict(model_fingerprint="tiny-abc", num_layers=3, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
    base.update(over)
    return KVLayout(**base)


def make_float_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) float32 [T, H, D] with a spread of magnitudes (outlier channels included)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layout.num_layers):
        shape = (num_tokens, layout.num_kv_heads, layout.head_dim)
        k = torch.randn(shape, generator=g) * torch.logspace(-2, 1.5, layout.head_dim)
        v = torch.randn(shape, generator=g)
        out.append((k, v))
    return out


def make_payloads(layout: KVLayout, kv_dtype: KVDtype, num_tokens: int, seed: int = 0) -> list[KVLayerPayload]:
    wire = wire_dtype_of(kv_dtype)
    payloads = []
    for layer, (k, v) in enumerate(make_float_kv(layout, num_tokens, seed)):
        qk, sk = quantize(k, wire)
        qv, sv = quantize(v, wire)
        payloads.append(KVLayerPayload(layer=layer, token_start=0, k=qk, v=qv, k_scale=sk, v_scale=sv))
    return payloads


class FakeSink:
    """A KVSink with a block pool: reserve takes ceil(tokens / block_size) blocks, release returns them.

    Written KV is kept dequantized (float32) per request and layer so tests can compare values,
    and every write is checked (dtype, shape, token range, no overlap) like a real paged cache would.
    """

    def __init__(self, layout: KVLayout, kv_dtype: KVDtype = KVDtype.FP8_E4M3, block_size: int = 8,
                 num_blocks: int = 4096) -> None:
        self._layout, self._dtype = layout, kv_dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.free_blocks = num_blocks
        self.lock = threading.Lock()
        self.reserved: dict[str, tuple[int, int]] = {}  # rid -> (num_tokens, num_blocks)
        self.values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.covered: dict[str, list[torch.Tensor]] = {}
        self.raw: dict[str, list[KVLayerPayload]] = {}
        self.released: list[str] = []

    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_dtype(self) -> KVDtype:
        return self._dtype

    def reserve_kv(self, request_id: str, layout: KVLayout, num_tokens: int) -> None:
        self._layout.check_compatible(layout)
        need = math.ceil(num_tokens / self.block_size)
        with self.lock:
            if need > self.free_blocks:
                raise KVCapacityError(f"need {need} blocks, {self.free_blocks} free")
            self.free_blocks -= need
            self.reserved[request_id] = (num_tokens, need)
            shape = (num_tokens, layout.num_kv_heads, layout.head_dim)
            self.values[request_id] = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(layout.num_layers)]
            self.covered[request_id] = [torch.zeros(num_tokens, dtype=torch.bool) for _ in range(layout.num_layers)]
            self.raw[request_id] = []

    def write_kv_layer(self, request_id: str, payload: KVLayerPayload) -> None:
        with self.lock:
            if request_id not in self.reserved:
                raise KVImportError(f"unknown request {request_id!r}")
            n = self.reserved[request_id][0]
            want = wire_dtype_of(self._dtype).torch_dtype
            if payload.k.dtype != want:
                raise KVImportError(f"dtype {payload.k.dtype} != {want}")
            a, b = payload.token_start, payload.token_start + payload.num_tokens
            if not 0 <= a < b <= n:
                raise KVImportError(f"tokens [{a}, {b}) outside [0, {n})")
            cov = self.covered[request_id][payload.layer]
            if bool(cov[a:b].any()):
                raise KVImportError("overlapping write")
            cov[a:b] = True
            k, v = self.values[request_id][payload.layer]
            k[a:b] = dequantize(payload.k, payload.k_scale)
            v[a:b] = dequantize(payload.v, payload.v_scale)
            self.raw[request_id].append(payload)

    def release_kv(self, request_id: str) -> None:
        with self.lock:
            entry = self.reserved.pop(request_id, None)
            if entry is not None:
                self.free_blocks += entry[1]
                self.released.append(request_id)
            self.values.pop(request_id, None)
            self.covered.pop(request_id, None)

    def complete(self, request_id: str) -> bool:
        """All layers fully covered."""
        return all(bool(c.all()) for c in self.covered[request_id])

    def assert_no_leaks(self) -> None:
        assert self.free_blocks == self.num_blocks, f"{self.num_blocks - self.free_blocks} blocks leaked: {self.reserved}"
        assert not self.reserved


class G2Sink(FakeSink):
    """A sink on a Gaudi 2-like device: it wants e4m3_g2 bytes (held as float8_e4m3fn)."""

    kv_wire_dtype = WireDtype.E4M3_G2


def split_tokens(p: KVLayerPayload, at: int) -> list[KVLayerPayload]:
    """Two payloads covering p's tokens [0, at) and [at, n) (what a chunked prefill would emit)."""
    def part(a: int, b: int) -> KVLayerPayload:
        sl = slice(a, b)
        return KVLayerPayload(
            layer=p.layer, token_start=p.token_start + a, k=p.k[sl], v=p.v[sl],
            k_scale=None if p.k_scale is None else p.k_scale[sl], v_scale=None if p.v_scale is None else p.v_scale[sl],
        )
    return [part(0, at), part(at, p.num_tokens)]

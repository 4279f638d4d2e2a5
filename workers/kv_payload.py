"""The KV-cache hand-off object between an engine and a transport.

An engine that ran prefill *exports* a request's KV as a `KVExport`: a manifest plus, per layer,
token-major K and V tensors (`[num_tokens, num_kv_heads, head_dim]`) in the storage dtype and, for
FP8, float32 scales per token per KV head (`[num_tokens, num_kv_heads]`). The object is independent
of the engine's block size: the receiver re-blocks into its own paged cache.

A receiving engine implements `KVSink`; a transport (gRPC or in-process) drives it layer by layer
as chunks arrive. The transport knows nothing of engines beyond this protocol; the engine knows
nothing of the wire. `workers/kv_transfer` serializes exactly these objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from orchestrator.core.types import KVDtype, TandemError


class KVLayoutMismatch(TandemError):
    """Two engines disagree on a factor that shapes the KV cache; the message names it."""


class KVCapacityError(TandemError):
    """The receiver has too few free KV blocks for the reservation."""


class KVImportError(TandemError):
    """A KV import was malformed (wrong shapes, missing layers, unknown request)."""


@dataclass(frozen=True)
class KVLayout:
    """Every factor that must agree for KV computed by one engine to be valid in another."""

    model_fingerprint: str  # hash of the model's config and weights identity
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; () when none

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.model_fingerprint,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": [list(kv) for kv in self.rope_scaling],
        }

    def compat_hash(self, protocol_version: int = 0) -> str:
        """Stable hex digest over exactly the layout factors (and a protocol version)."""
        blob = json.dumps({"v": protocol_version, **self.as_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def mismatches(self, other: KVLayout) -> list[str]:
        """Human-readable differences, e.g. ["num_kv_heads: 8 here vs 4 at peer"]."""
        a, b = self.as_dict(), other.as_dict()
        return [f"{k}: {a[k]!r} here vs {b[k]!r} at peer" for k in a if a[k] != b[k]]

    def check_compatible(self, other: KVLayout) -> None:
        diffs = self.mismatches(other)
        if diffs:
            raise KVLayoutMismatch("KV layout mismatch: " + "; ".join(diffs))


@dataclass
class KVLayerPayload:
    """One layer's KV for a token range. Tensors are torch tensors (typed Any: no torch import here).

    k, v: [num_tokens, num_kv_heads, head_dim], dtype bf16 or an fp8 dtype.
    k_scale, v_scale: [num_tokens, num_kv_heads] float32 for fp8 (dequantized = q * scale); None for bf16.
    """

    layer: int
    token_start: int
    k: Any
    v: Any
    k_scale: Any | None = None
    v_scale: Any | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.k.shape[0])


@dataclass
class KVExport:
    """A request's whole prefill KV plus what the decode side needs to continue."""

    request_id: str
    layout: KVLayout
    kv_dtype: KVDtype
    prompt_token_ids: list[int]
    first_token_id: int | None  # sampled by prefill; decode continues from it
    layers: list[KVLayerPayload] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def nbytes(self) -> int:
        total = 0
        for p in self.layers:
            for t in (p.k, p.v, p.k_scale, p.v_scale):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


@runtime_checkable
class KVSink(Protocol):
    """The receiving side of a KV hand-off (implemented by the engine; faked in tests).

    Order: reserve_kv → write_kv_layer (any layer order, each layer's tokens exactly once)
    → the caller then starts decoding (engine-specific) — or release_kv on any failure.
    """

    @property
    def kv_layout(self) -> KVLayout: ...

    @property
    def kv_dtype(self) -> KVDtype: ...

    def reserve_kv(self, request_id: str, layout: KVLayout, num_tokens: int) -> None:
        """Allocate blocks for num_tokens. Raises KVLayoutMismatch or KVCapacityError."""

    def write_kv_layer(self, request_id: str, payload: KVLayerPayload) -> None:
        """Write one layer's token range into the reserved blocks (payload in self.kv_dtype)."""

    def release_kv(self, request_id: str) -> None:
        """Free the reservation. Idempotent; unknown ids are ignored."""

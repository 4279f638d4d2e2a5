"""KV element formats on the wire and the conversions between them.

Four explicit variants (`WireDtype`); a payload always says which one it carries:

- `e4m3fn`  OCP/NVIDIA E4M3 (bias 7, no infinities, NaN = S.1111.111), max finite 448.
- `e4m3_g2` Gaudi 2's E4M3 (bias 7, IEEE-style: exponent 1111 is reserved for Inf/NaN), max 240.
- `e5m2`    E5M2 (bias 15, IEEE-style), max 57344.
- `bf16`    bfloat16, no scales.

How `e4m3_g2` is emulated (bit-exact): both E4M3 formats use exponent bias 7 and the same encodings
for every finite value whose exponent field is below 1111, i.e. for every |x| <= 240 (1.875 * 2^7)
including subnormals. So a `e4m3_g2` byte is exactly the `e4m3fn` byte of the same value, and
we hold `e4m3_g2` data in `torch.float8_e4m3fn` tensors with the invariant that no byte has its
exponent field all ones. (torch's `float8_e4m3fnuz` also tops out at 240 but uses bias 8 and a
different NaN, so its bytes are NOT Gaudi 2's; we do not use it.)

Rule for narrowing to a smaller max: rescale, never saturate. `e4m3fn` -> `e4m3_g2` divides each
(token, KV head) row whose |q| exceeds 240 by amax/240 and multiplies that row's scale by the same
factor; rows that already fit are copied bit for bit. Every other conversion between different
variants dequantizes to float32 (`x = q * scale`) and re-quantizes per (token, KV head) with
`scale = amax / max_finite` of the target (round to nearest even, torch's cast).

Scales: float32 `[num_tokens, num_kv_heads]`, dequantized = q * scale (`KVLayerPayload`'s contract).
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVLayerPayload


class WireDtype(enum.StrEnum):
    """The element format of KV on the wire (the `dt` header field)."""

    BF16 = "bf16"
    E4M3FN = "e4m3fn"
    E4M3_G2 = "e4m3_g2"
    E5M2 = "e5m2"

    @property
    def is_fp8(self) -> bool:
        return self is not WireDtype.BF16

    @property
    def bytes_per_element(self) -> int:
        return 2 if self is WireDtype.BF16 else 1

    @property
    def max_finite(self) -> float:
        return _MAX_FINITE[self]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPE[self]


_MAX_FINITE = {
    WireDtype.BF16: float(torch.finfo(torch.bfloat16).max),
    WireDtype.E4M3FN: 448.0,
    WireDtype.E4M3_G2: 240.0,
    WireDtype.E5M2: 57344.0,
}
_TORCH_DTYPE = {
    WireDtype.BF16: torch.bfloat16,
    WireDtype.E4M3FN: torch.float8_e4m3fn,
    WireDtype.E4M3_G2: torch.float8_e4m3fn,  # bit-exact subset, see module docstring
    WireDtype.E5M2: torch.float8_e5m2,
}
# Smallest sign-less byte that encodes NaN/Inf, per variant (e4m3fn: only S.1111.111 is NaN;
# e4m3_g2: exponent 1111; e5m2: exponent 11111). bf16 uses 0x7F80 on 16 bits.
_NONFINITE_MIN_U8 = {WireDtype.E4M3FN: 0x7F, WireDtype.E4M3_G2: 0x78, WireDtype.E5M2: 0x7C}


def wire_dtype_of(kv_dtype: KVDtype) -> WireDtype:
    """The wire variant an engine's storage dtype is sent as by default."""
    return {
        KVDtype.BF16: WireDtype.BF16,
        KVDtype.FP8_E4M3: WireDtype.E4M3FN,
        KVDtype.FP8_E5M2: WireDtype.E5M2,
    }[kv_dtype]


def has_nonfinite(t: torch.Tensor, wire: WireDtype) -> bool:
    """True when any element of `t` (held in `wire`'s torch dtype) encodes NaN or Inf in `wire`.

    With the sign bit cleared an encoding is non-finite exactly when it is >= a threshold (0x78
    for e4m3_g2: exponent 1111). Two max-reductions without temporaries decide it: the signed
    view catches positive encodings, the unsigned view negative ones (numpy: fast on CPU).
    """
    if t.numel() == 0:
        return False
    if wire is WireDtype.BF16:
        i16 = t.contiguous().view(torch.int16).numpy()
        return int(i16.max()) >= 0x7F80 or int(i16.view(np.uint16).max()) >= 0xFF80
    lo = _NONFINITE_MIN_U8[wire]
    i8 = t.contiguous().view(torch.int8).numpy()
    return int(i8.max()) >= lo or int(i8.view(np.uint8).max()) >= 0x80 | lo


def has_nonfinite_bytes(buf: memoryview, wire: WireDtype) -> bool:
    """`has_nonfinite` on raw little-endian bytes of `wire` elements (numpy only, no torch dispatch).
    len(buf) must be a multiple of the element size."""
    if len(buf) == 0:
        return False
    if wire is WireDtype.BF16:
        i16 = np.frombuffer(buf, dtype="<i2")
        return int(i16.max()) >= 0x7F80 or int(i16.view("<u2").max()) >= 0xFF80
    lo = _NONFINITE_MIN_U8[wire]
    i8 = np.frombuffer(buf, dtype=np.int8)
    return int(i8.max()) >= lo or int(i8.view(np.uint8).max()) >= 0x80 | lo


def quantize(x: torch.Tensor, wire: WireDtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize float `x [T, H, D]` per (token, head): returns (q, scale [T, H] float32) or (bf16, None)."""
    if wire is WireDtype.BF16:
        return x.to(torch.bfloat16), None
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / wire.max_finite, torch.ones_like(amax))
    q = (xf / scale.unsqueeze(-1)).clamp(-wire.max_finite, wire.max_finite).to(wire.torch_dtype)
    return q, scale.to(torch.float32)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of a stored tensor (`q * scale` for FP8, a plain upcast for bf16)."""
    if scale is None:
        return q.float()
    return q.float() * scale.float().unsqueeze(-1)


def _narrow_e4m3fn_to_g2(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qf = q.float()
    amax = qf.abs().amax(dim=-1)
    factor = torch.clamp(amax / WireDtype.E4M3_G2.max_finite, min=1.0)  # 1 for rows that fit
    q2 = (qf / factor.unsqueeze(-1)).to(torch.float8_e4m3fn)  # rows with factor 1 are exact copies
    return q2, (scale.float() * factor).to(torch.float32)


def _convert_tensor(
    q: torch.Tensor, scale: torch.Tensor | None, src: WireDtype, dst: WireDtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if src is dst:
        return q, scale
    if src is WireDtype.E4M3_G2 and dst is WireDtype.E4M3FN:
        return q, scale  # every e4m3_g2 byte is the e4m3fn byte of the same value
    if src is WireDtype.E4M3FN and dst is WireDtype.E4M3_G2:
        assert scale is not None
        return _narrow_e4m3fn_to_g2(q, scale)
    return quantize(dequantize(q, scale), dst)


def transcode(payload: KVLayerPayload, src: WireDtype, dst: WireDtype) -> KVLayerPayload:
    """Convert one layer's KV from variant `src` to `dst` (scales follow; never saturates)."""
    if src is dst:
        return payload
    k, ks = _convert_tensor(payload.k, payload.k_scale, src, dst)
    v, vs = _convert_tensor(payload.v, payload.v_scale, src, dst)
    return KVLayerPayload(layer=payload.layer, token_start=payload.token_start, k=k, v=v, k_scale=ks, v_scale=vs)

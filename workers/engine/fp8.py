"""FP8 quantization primitives (torch references; exact on any device).

Conventions: `dequantized = q.float() * scale`. Scales are float32. Rounding is round-to-nearest-even
(torch's cast) or stochastic: the value goes to one of its two FP8 neighbours with probability
proportional to closeness, so the expectation equals the input. Activation draws come from a
counter-based hash of (row key = token position, column, salt) — no RNG state — so a token's rounding
depends only on its position, never on which other requests share the batch. Weight draws (once, at
load) come from a generator seeded with the layer's salt.
"""

from __future__ import annotations

import torch

from orchestrator.core.types import FP8Format, KVDtype, Rounding

_FP8_DTYPES = {FP8Format.E4M3: torch.float8_e4m3fn, FP8Format.E5M2: torch.float8_e5m2}
_KV_DTYPES = {
    KVDtype.BF16: torch.bfloat16,
    KVDtype.FP8_E4M3: torch.float8_e4m3fn,
    KVDtype.FP8_E5M2: torch.float8_e5m2,
}
_MIN_SCALE = 1e-12
_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # (mantissa bits, min normal exponent)


def fp8_dtype(fmt: FP8Format) -> torch.dtype:
    return _FP8_DTYPES[FP8Format(fmt)]


def kv_storage_dtype(kv_dtype: KVDtype) -> torch.dtype:
    return _KV_DTYPES[KVDtype(kv_dtype)]


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def hash_uniform(row_keys: torch.Tensor, num_cols: int, salt: int) -> torch.Tensor:
    """Deterministic uniform [0, 1) noise of shape [len(row_keys), num_cols] from a 32-bit mixing hash."""
    mask = 0xFFFFFFFF
    rows = row_keys.to(torch.int64).reshape(-1, 1) & mask
    cols = torch.arange(num_cols, dtype=torch.int64, device=row_keys.device).reshape(1, -1)
    h = (rows * 0x5BD1E995 + cols * 0x1B873593 + (salt & 0x7FFFFFFF) * 0x27D4EB2F) & mask
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & mask
    h = h ^ (h >> 12)
    h = (h * 0x297A2D39) & mask
    h = h ^ (h >> 15)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def round_to_fp8(
    y: torch.Tensor, dtype: torch.dtype, rounding: Rounding = Rounding.NEAREST, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Cast float32 `y` (already scaled) to `dtype`, saturating at the format's max.

    rounding=STOCHASTIC needs `noise`, uniform [0, 1) of y's shape.
    """
    fmax = fp8_max(dtype)
    y = y.float().clamp(-fmax, fmax)
    if Rounding(rounding) is Rounding.NEAREST:
        return y.to(dtype)
    if noise is None:
        raise ValueError("stochastic rounding needs a noise tensor")
    # the two grid points around |y|: lo = |y| rounded down to the binade's spacing (a power of two), hi = lo + ulp
    mant_bits, min_exp = _GRID[dtype]
    mag = y.abs()
    _, exp = torch.frexp(mag)  # mag = m * 2**exp with m in [0.5, 1)
    ulp = torch.exp2(((exp - 1).clamp_min(min_exp) - mant_bits).to(torch.float32))
    lo = torch.floor(mag / ulp) * ulp
    p_hi = (mag - lo) / ulp
    chosen = torch.where(noise.reshape(mag.shape) < p_hi, (lo + ulp).clamp_max(fmax), lo)
    return (chosen * torch.sign(y)).to(dtype)


def quantize_per_row(
    x: torch.Tensor,
    dtype: torch.dtype,
    rounding: Rounding = Rounding.NEAREST,
    row_keys: torch.Tensor | None = None,
    salt: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) quantization of x [M, K]. Returns (q [M, K], scale [M, 1])."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / fp8_max(dtype)).clamp_min(_MIN_SCALE)
    noise = _noise_for(xf, rounding, row_keys, salt)
    return round_to_fp8(xf / scale, dtype, rounding, noise), scale


def quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    rounding: Rounding = Rounding.NEAREST,
    row_keys: torch.Tensor | None = None,
    salt: int = 0,
) -> torch.Tensor:
    """Quantize x [M, K] with a given (broadcastable) float32 scale, saturating out-of-range values."""
    xf = x.float()
    noise = _noise_for(xf, rounding, row_keys, salt)
    return round_to_fp8(xf / scale, dtype, rounding, noise)


def _noise_for(
    xf: torch.Tensor, rounding: Rounding, row_keys: torch.Tensor | None, salt: int
) -> torch.Tensor | None:
    if Rounding(rounding) is Rounding.NEAREST:
        return None
    if row_keys is None:
        row_keys = torch.arange(xf.shape[0], device=xf.device)
    return hash_uniform(row_keys, xf.shape[-1], salt).to(xf.device)


def quantize_weight(
    w: torch.Tensor, dtype: torch.dtype, per_channel: bool, rounding: Rounding = Rounding.NEAREST, salt: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K]. Returns (q [N, K], scale [N] per output channel or [1] per tensor)."""
    wf = w.float()
    if per_channel:
        amax = wf.abs().amax(dim=1)
    else:
        amax = wf.abs().amax().reshape(1)
    scale = (amax / fp8_max(dtype)).clamp_min(_MIN_SCALE)
    noise = None
    if Rounding(rounding) is Rounding.STOCHASTIC:  # weights are rounded once: a seeded generator suffices
        gen = torch.Generator().manual_seed(0x5EED + salt)
        noise = torch.rand(wf.shape, generator=gen).to(wf.device)
    return round_to_fp8(wf / scale.reshape(-1, 1), dtype, rounding, noise), scale


def quantize_kv(x: torch.Tensor, kv_dtype: KVDtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KV [T, kv_heads, head_dim] → storage tensor and, for FP8, float32 scales [T, kv_heads]."""
    kv_dtype = KVDtype(kv_dtype)
    dt = kv_storage_dtype(kv_dtype)
    if not kv_dtype.is_fp8:
        return x.to(dt), None
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / fp8_max(dt)).clamp_min(_MIN_SCALE)
    return round_to_fp8(xf / scale.unsqueeze(-1), dt), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv` (up to rounding): q [..., head_dim], scale [...] or None."""
    if scale is None:
        return q.to(out_dtype)
    return (q.float() * scale.unsqueeze(-1)).to(out_dtype)

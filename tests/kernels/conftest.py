"""Kernel-test setup: a test-only repair of the Triton interpreter's numerics, and input factories.

The interpreter (triton 3.6 and 3.9) has three numeric bugs (../shared/NOTES.md): fp32→fp8 casts lose the
carry into the exponent and do not saturate; fp32→bf16 casts truncate instead of rounding to nearest even;
`tl.dot` on bf16 operands multiplies raw uint16 bit patterns. The fixture below replaces the interpreter's
float conversion with torch casts (which round to nearest even, as the GPU's cvt.rn does) and its dot with a
float32 matmul of the upcast operands (bf16/fp8 → fp32 is exact). It is applied for the whole session, before
any kernel runs, and only when the interpreter is on.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

try:
    import triton.language as tl
    from triton.runtime import interpreter as _interp
except Exception:  # pragma: no cover - triton missing: kernel tests are skipped by their imports
    _interp = None


def _torch_dtype(tt) -> torch.dtype:
    table = {
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
        tl.float8e4b8: torch.float8_e4m3fnuz,
        tl.float8e5b16: torch.float8_e5m2fnuz,
        tl.bfloat16: torch.bfloat16,
        tl.float16: torch.float16,
        tl.float32: torch.float32,
        tl.float64: torch.float64,
    }
    return table[tt]


_RAW_TORCH = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}
_RAW_NP = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _to_torch(data: np.ndarray, tt) -> torch.Tensor:
    """The interpreter's storage of a float tensor (bits for bf16/fp8) → a torch tensor of that dtype."""
    bits = tt.primitive_bitwidth
    arr = np.ascontiguousarray(data)
    raw = torch.from_numpy(arr.view(_RAW_NP[bits]).view({8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}[bits]))
    return raw.view(_torch_dtype(tt))


def _convert_float_via_torch(input, input_dtype, output_dtype, rounding_mode):
    src = _to_torch(input, input_dtype)
    # Through float32 (exact for every narrower input); saturate for fp8 outputs as the GPU's satfinite does.
    f = src.to(torch.float64) if input_dtype.primitive_bitwidth == 64 else src.to(torch.float32)
    out_t = _torch_dtype(output_dtype)
    if output_dtype.primitive_bitwidth == 8:
        fmax = torch.finfo(out_t).max
        f = f.clamp(-fmax, fmax)
    out = f.to(out_t)
    bits = output_dtype.primitive_bitwidth
    return out.view(_RAW_TORCH[bits]).numpy().view(_RAW_NP[bits]).reshape(np.shape(input))


def _dot_via_torch(self, a, b, d, input_precision, max_num_imprecise_acc):
    def as_f32(h):
        if h.dtype.is_floating() and h.dtype.primitive_bitwidth < 32:
            return _to_torch(h.data, h.dtype).to(torch.float32).numpy()
        return h.data

    out = np.matmul(as_f32(a), as_f32(b), dtype=d.data.dtype) + d.data
    return _interp.TensorHandle(out, d.dtype.scalar)


@pytest.fixture(scope="session", autouse=True)
def patched_triton_interpreter():
    """Route the interpreter's float casts and dots through torch for the whole kernel-test session."""
    if _interp is None or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    saved = (_interp._convert_float, _interp.InterpreterBuilder.create_dot)
    _interp._convert_float = _convert_float_via_torch
    _interp.InterpreterBuilder.create_dot = _dot_via_torch
    try:
        yield
    finally:
        _interp._convert_float, _interp.InterpreterBuilder.create_dot = saved


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, differently seeded generator per test (inputs are random, never zeros)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tests take a `dev` parameter: "cpu" runs through the Triton interpreter (skipped when it is off, e.g. on the
# GPU machine), "cuda" runs the compiled kernels (marked gpu: skipped without a GPU).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    o, r = out.double().cpu(), ref.double().cpu()
    if torch.isnan(o).any():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))

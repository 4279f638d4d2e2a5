"""The test-only interpreter repair does what it claims (and would fail if the patch were removed)."""

import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.conftest import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter")


@triton.jit
def _cast_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(out_ptr.dtype.element_ty))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_float_casts_match_torch(dtype, gen):
    x = torch.randn(64, generator=gen) * 300
    x[:4] = torch.tensor([-126.1, 500.0, 447.9, -1000.0])  # exponent carry and saturation cases
    out = torch.empty(64, dtype=dtype)
    _cast_kernel[(1,)](x, out, N=64)
    fmax = torch.finfo(dtype).max
    expect = x.clamp(-fmax, fmax).to(dtype)
    assert torch.equal(out.float(), expect.float())


def test_bf16_dot_matches_float32_matmul(gen):
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)

"""Fused RMSNorm+quant, SiLU-mul+quant and standalone per-token quant against their torch references."""

import pytest
import torch

from tests.kernels.conftest import DEVICES, rel_err
from workers.kernels import reference as R
from workers.kernels._common import KernelInputError
from workers.kernels.quant import quantize_per_token, rms_norm_quant, silu_mul_quant

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _shapes(dev, cpu, gpu):
    return cpu if dev == "cpu" else gpu


def _assert_quant_close(q, s, qr, sr, fp8_dtype):
    """Scales agree to float32 rounding; codes agree except where a different float32 reduction order
    (or a GPU approximation) moves a value across a rounding boundary: such codes must be adjacent
    (one step apart in the fp8 grid, same sign) and rare."""
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=1e-5, atol=0)
    a, b = q.cpu().view(torch.uint8).int(), qr.cpu().view(torch.uint8).int()
    differ = a != b
    n_differ = int(differ.sum())
    # Same sign bit and one code apart: the two values are neighbours on the fp8 grid.
    assert torch.all(((a ^ b) & 0x80)[differ] == 0), "an FP8 code differs in sign"
    assert torch.all((a - b).abs()[differ] <= 1), "an FP8 code differs by more than one grid step"
    assert n_differ <= max(1, int(2e-3 * q.numel())), f"{n_differ} of {q.numel()} FP8 codes differ"
    deq, deq_ref = q.float() * s[..., None], qr.float() * sr[..., None]
    assert rel_err(deq, deq_ref) < 1e-2


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant(dev, fp8_dtype, with_residual, gen):
    for M, D in _shapes(dev, [(1, 128), (7, 200)], [(1, 4096), (37, 4096), (129, 5120), (300, 1000)]):
        x = (torch.randn(M, D, generator=gen) * 3).to(torch.bfloat16).to(dev)
        w = torch.randn(D, generator=gen).to(torch.bfloat16).to(dev)
        r = torch.randn(M, D, generator=gen).to(torch.bfloat16).to(dev) if with_residual else None
        q, s, nr = rms_norm_quant(x, w, 1e-5, fp8_dtype, residual=r)
        qr, sr, nrr = R.rms_norm_quant_ref(x, w, 1e-5, fp8_dtype, residual=r)
        assert q.dtype == fp8_dtype and q.shape == x.shape and s.shape == (M,)
        _assert_quant_close(q, s, qr, sr, fp8_dtype)
        if with_residual:
            assert torch.equal(nr, nrr)
        else:
            assert nr is None


@pytest.mark.parametrize("dev", DEVICES)
def test_rms_norm_bf16_out_and_3d_input(dev, gen):
    x = torch.randn(2, 3, 160, generator=gen).to(torch.bfloat16).to(dev)
    w = torch.randn(160, generator=gen).to(torch.bfloat16).to(dev)
    y, s, _ = rms_norm_quant(x, w, 1e-6, None)
    yr, _ = R.rms_norm_ref(x, w, 1e-6)
    assert s is None and y.dtype == torch.bfloat16 and y.shape == x.shape
    assert rel_err(y, yr) < 4e-3


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("fp8_dtype", FP8)
def test_silu_mul_quant(dev, fp8_dtype, gen):
    for M, inter in _shapes(dev, [(1, 128), (5, 300)], [(1, 14336), (37, 1000), (300, 14336)]):
        gu = (torch.randn(M, 2 * inter, generator=gen) * 4).to(torch.bfloat16).to(dev)
        q, s = silu_mul_quant(gu, fp8_dtype)
        qr, sr = R.silu_mul_quant_ref(gu, fp8_dtype)
        assert q.shape == (M, inter)
        _assert_quant_close(q, s, qr, sr, fp8_dtype)
    y, none = silu_mul_quant(gu, None)
    assert none is None and rel_err(y, R.silu_mul_ref(gu)) < 4e-3


@pytest.mark.parametrize("dev", DEVICES)
def test_quantize_per_token_zero_rows_and_saturation(dev, gen):
    x = torch.randn(6, 96, generator=gen).to(dev)
    x[2] = 0.0  # an all-zero row quantizes to zeros with a finite positive scale
    x[4, 7] = 1e30
    q, s = quantize_per_token(x, torch.float8_e4m3fn)
    qr, sr = R.quantize_per_token_ref(x, torch.float8_e4m3fn)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q[2].float().cpu(), torch.zeros(96))
    assert q[4, 7].float().item() == 448.0
    _assert_quant_close(q, s, qr, sr, torch.float8_e4m3fn)


def test_bad_inputs_raise_typed_errors():
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(KernelInputError, match="weight must have shape"):
        rms_norm_quant(x, torch.ones(32), 1e-5, torch.float8_e4m3fn)
    with pytest.raises(KernelInputError, match="FP8 dtype"):
        rms_norm_quant(x, torch.ones(64), 1e-5, torch.int8)
    with pytest.raises(KernelInputError, match="even"):
        silu_mul_quant(torch.randn(2, 7), torch.float8_e4m3fn)
    with pytest.raises(KernelInputError, match="bf16, fp16 or fp32"):
        quantize_per_token(torch.ones(2, 8, dtype=torch.int32), torch.float8_e4m3fn)

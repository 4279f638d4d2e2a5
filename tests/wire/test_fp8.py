"""FP8 wire variants: conversion error against a float64 reference, Gaudi 2 E4M3 bit-exactness."""

from __future__ import annotations

import itertools

import pytest
import torch

from workers.kv_payload import KVLayerPayload
from workers.kv_transfer.fp8 import WireDtype, dequantize, has_nonfinite, quantize, transcode

# Worst rounding error of per-(token, head) quantization, relative to the row's amax: half the
# spacing of the top binade divided by the format's max (e4m3fn: 16/448, e4m3_g2: 8/240, ...).
HALF_ULP_REL = {
    WireDtype.BF16: 2.0**-8,
    WireDtype.E4M3FN: 16 / 448,
    WireDtype.E4M3_G2: 8 / 240,
    WireDtype.E5M2: 4096 / 57344,
}


def g2_reference_value(b: int) -> float:
    """Gaudi 2 E4M3 decoded in float64 from its definition: bias 7, exponent 1111 = Inf/NaN."""
    sign = -1.0 if b & 0x80 else 1.0
    exp, man = (b >> 3) & 0xF, b & 0x7
    if exp == 0xF:
        return float("nan") if man else sign * float("inf")
    if exp == 0:
        return sign * (man / 8) * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _reference_kv(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 4, 32, dtype=torch.float64, generator=g)
    x = x * torch.logspace(-4, 3, 32, dtype=torch.float64)  # 7 decades across channels
    x[5, 1, 3] = 0.0
    x[7] = 0.0  # an all-zero token
    return x


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(WireDtype, WireDtype)))
def test_conversion_error_against_float64_reference(src, dst):
    x = _reference_kv()
    q, s = quantize(x.float(), src)
    out = transcode(KVLayerPayload(layer=0, token_start=0, k=q, v=q, k_scale=s, v_scale=s), src, dst)
    assert out.k.dtype == dst.torch_dtype
    y = dequantize(out.k, out.k_scale).double()
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    rel = ((y - x).abs() / amax).amax().item()
    bound = HALF_ULP_REL[src] + (0 if src is dst else HALF_ULP_REL[dst]) * 1.01 + 1e-6
    if (src, dst) == (WireDtype.E4M3FN, WireDtype.E4M3_G2):
        bound = HALF_ULP_REL[src] + HALF_ULP_REL[dst] * 1.01
    assert rel <= bound, f"{src.value}->{dst.value}: max error {rel:.4f} of row amax > bound {bound:.4f}"
    assert torch.isfinite(y).all()
    assert (y[7] == 0).all(), "a zero token must stay exactly zero"
    if dst.is_fp8:
        assert not has_nonfinite(out.k, dst)


def test_g2_bytes_are_the_e4m3fn_bytes_of_the_same_value():
    b = torch.arange(256, dtype=torch.uint8)
    fn_vals = b.view(torch.float8_e4m3fn).double()
    for i in range(256):
        ref = g2_reference_value(i)
        if (i & 0x78) == 0x78:
            assert not (abs(ref) <= 240), f"byte {i:#04x} must be Inf/NaN in Gaudi 2 E4M3"
            continue
        assert fn_vals[i].item() == ref, f"byte {i:#04x}: e4m3fn {fn_vals[i].item()} vs g2 {ref}"
    finite = [g2_reference_value(i) for i in range(256) if (i & 0x78) != 0x78]
    assert max(finite) == 240.0


def test_e4m3fn_to_g2_rescales_instead_of_saturating():
    x = torch.tensor([[[448.0, -448.0, 300.0, 1.0]], [[200.0, -3.5, 0.25, 0.0]]])  # [T=2, H=1, D=4]
    q = x.to(torch.float8_e4m3fn)  # stored values as they are: token 0 uses the range above 240
    scale = torch.tensor([[0.5], [0.01]])
    p = KVLayerPayload(layer=0, token_start=0, k=q, v=q, k_scale=scale, v_scale=scale)
    out = transcode(p, WireDtype.E4M3FN, WireDtype.E4M3_G2)
    # token 1 fits in 240: copied bit for bit, same scale
    assert torch.equal(out.k[1].view(torch.uint8), q[1].view(torch.uint8))
    assert out.k_scale[1].item() == scale[1].item()
    # token 0 had |q| = 448 > 240: scale grows by 448/240, values survive (no clamp to 240)
    assert out.k_scale[0].item() == pytest.approx(0.5 * 448 / 240, rel=1e-6)
    before = dequantize(q, scale)[0, 0]
    after = dequantize(out.k, out.k_scale)[0, 0]
    assert after[0].item() == pytest.approx(before[0].item(), rel=HALF_ULP_REL[WireDtype.E4M3_G2])
    assert after[1].item() == pytest.approx(-448 * 0.5, rel=HALF_ULP_REL[WireDtype.E4M3_G2])
    u = out.k.view(torch.uint8)
    assert not bool(((u & 0x78) == 0x78).any()), "no byte may use the Inf/NaN exponent of Gaudi 2 E4M3"


def test_g2_to_e4m3fn_is_bit_exact():
    x = _reference_kv(1).float()
    q, s = quantize(x, WireDtype.E4M3_G2)
    out = transcode(KVLayerPayload(0, 0, q, q, s, s), WireDtype.E4M3_G2, WireDtype.E4M3FN)
    assert torch.equal(out.k.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out.k_scale, s)


@pytest.mark.parametrize("wire", list(WireDtype))
def test_nonfinite_detection(wire):
    x = torch.randn(4, 2, 8)
    q, _ = quantize(x, wire)
    assert not has_nonfinite(q, wire)
    bad = q.clone()
    bad.view(torch.uint8 if wire.is_fp8 else torch.int16).view(-1)[3] = {
        WireDtype.BF16: 0x7FC0, WireDtype.E4M3FN: 0x7F, WireDtype.E4M3_G2: 0x78, WireDtype.E5M2: 0x7C,
    }[wire]
    assert has_nonfinite(bad, wire)

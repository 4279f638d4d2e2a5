"""Quantize-and-write of new K/V into the paged cache against the torch reference."""

import pytest
import torch

from tests.kernels.conftest import DEVICES
from workers.kernels import reference as R
from workers.kernels._common import KernelInputError
from workers.kernels.kv_cache import kv_write


def _caches(dtype, num_blocks, block_size, H, D, dev, transposed=False):
    """Poisoned caches (NaN-free sentinel values) so that unwritten slots are visible."""
    if transposed:  # [blocks, H, block_size, D] storage viewed as [blocks, block_size, H, D]
        c = torch.full((num_blocks, H, block_size, D), 3.0, device=dev).to(dtype).transpose(1, 2)
        s = torch.full((num_blocks, H, block_size), -1.0, device=dev).transpose(1, 2)
    else:
        c = torch.full((num_blocks, block_size, H, D), 3.0, device=dev).to(dtype)
        s = torch.full((num_blocks, block_size, H), -1.0, device=dev)
    return c, s


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_kv_write_matches_reference(dev, dtype, transposed, gen):
    T, H, D, nb, bs = (13, 3, 48, 6, 8) if dev == "cpu" else (77, 8, 128, 40, 16)
    k = (torch.randn(T, H, D, generator=gen) * 5).to(torch.bfloat16).to(dev)
    v = torch.randn(T, H, D, generator=gen).to(torch.bfloat16).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(dev)
    slots[3] = -1  # skipped token (padding)
    fp8 = dtype != torch.bfloat16
    got = [_caches(dtype, nb, bs, H, D, dev, transposed) for _ in range(2)]
    want = [_caches(dtype, nb, bs, H, D, dev, transposed) for _ in range(2)]
    kv_write(k, v, slots, got[0][0], got[1][0], got[0][1] if fp8 else None, got[1][1] if fp8 else None)
    R.kv_write_ref(k, v, slots, want[0][0], want[1][0], want[0][1] if fp8 else None, want[1][1] if fp8 else None)
    for (gc, gs), (wc, ws) in zip(got, want, strict=True):
        if dev == "cpu":
            assert torch.equal(gc.float(), wc.float())
        else:  # a GPU division may move a rounding tie by one code
            assert (gc.float() != wc.float()).float().mean().item() < 2e-3
        if fp8:
            torch.testing.assert_close(gs, ws, rtol=1e-6, atol=0)
    # every slot no token was mapped to kept its sentinel
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    flat = got[0][0].reshape(nb * bs, H, D) if not transposed else got[0][0].contiguous().reshape(nb * bs, H, D)
    assert (flat[untouched.to(flat.device)].float() == 3.0).all()


def test_kv_write_rejects_bad_inputs():
    k = torch.randn(4, 2, 32).to(torch.bfloat16)
    c = torch.zeros(2, 8, 2, 32).to(torch.float8_e4m3fn)
    with pytest.raises(KernelInputError, match="k_scale"):
        kv_write(k, k, torch.arange(4), c, c.clone())
    with pytest.raises(KernelInputError, match="slot_mapping"):
        kv_write(k, k, torch.arange(4.0), c, c.clone(), torch.zeros(2, 8, 2), torch.zeros(2, 8, 2))
    with pytest.raises(KernelInputError, match="k_cache must be"):
        kv_write(k, k, torch.arange(4), torch.zeros(2, 8, 3, 32), torch.zeros(2, 8, 3, 32))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_rope_kv_write_matches_reference(dev, dtype, gen):
    from workers.kernels.kv_cache import rope_kv_write

    T, Hq, Hkv, D, nb, bs = (9, 4, 2, 32, 4, 8) if dev == "cpu" else (77, 32, 8, 128, 40, 16)
    qkv = (torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen) * 3).to(torch.bfloat16).to(dev)
    pos = torch.randint(0, 9000, (T,), generator=gen).to(dev)
    inv = (1.0 / 500000.0 ** (torch.arange(0, D, 2).float() / D)).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(dev)
    slots[1] = -1
    fp8 = dtype != torch.bfloat16
    got = [_caches(dtype, nb, bs, Hkv, D, dev) for _ in range(2)]
    want = [_caches(dtype, nb, bs, Hkv, D, dev) for _ in range(2)]
    sc = (lambda c: (c[0][1], c[1][1])) if fp8 else (lambda c: (None, None))
    k_out = torch.empty(T, Hkv, D, dtype=torch.bfloat16, device=dev)
    q = rope_kv_write(qkv, pos, inv, Hq, slots, got[0][0], got[1][0], *sc(got), k_out=k_out)
    q_ref = R.rope_kv_write_ref(qkv, pos, inv, Hq, slots, want[0][0], want[1][0], *sc(want))
    assert q.shape == (T, Hq, D)
    k_ref = R.rope_ref(qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D), pos, inv)
    torch.testing.assert_close(k_out.float(), k_ref, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=8e-3, atol=1e-2)
    for (gc, gs), (wc, ws) in zip(got, want, strict=True):
        # cos/sin may differ in the last bit between the kernel and torch: allow rare one-code moves
        diff = (gc.float() - wc.float()).abs()
        assert (diff > 0).float().mean().item() < 0.02
        if fp8:
            torch.testing.assert_close(gs, ws, rtol=1e-5, atol=0)

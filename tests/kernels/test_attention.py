"""Paged decode attention (FP8 and bf16 KV) against the torch reference, split and unsplit."""

import math

import pytest
import torch

from tests.kernels.conftest import DEVICES, rel_err
from workers.kernels import reference as R
from workers.kernels._common import KernelInputError
from workers.kernels.attention import paged_decode_attention
from workers.kernels.kv_cache import kv_write


def _filled_cache(lens, Hkv, D, bs, dtype, dev, gen):
    """A paged cache holding random K/V for each sequence, in shuffled blocks; returns caches and block table."""
    blocks = [math.ceil(n / bs) for n in lens]
    nb = sum(blocks) + 3
    kc = torch.zeros(nb, bs, Hkv, D, device=dev).to(dtype)
    vc = torch.zeros_like(kc)
    fp8 = dtype != torch.bfloat16
    ks = torch.zeros(nb, bs, Hkv, device=dev) if fp8 else None
    vs = torch.zeros(nb, bs, Hkv, device=dev) if fp8 else None
    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(len(lens), max(blocks) + 2, dtype=torch.int32)
    i = 0
    for b, n in enumerate(lens):
        table[b, : blocks[b]] = perm[i : i + blocks[b]]
        i += blocks[b]
        t = torch.arange(n)
        slots = (table[b].long()[t // bs] * bs + t % bs).to(dev)
        k = (torch.randn(n, Hkv, D, generator=gen) * 2).to(torch.bfloat16).to(dev)
        v = torch.randn(n, Hkv, D, generator=gen).to(torch.bfloat16).to(dev)
        kv_write(k, v, slots, kc, vc, ks, vs)
    return kc, vc, ks, vs, table.to(dev)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_paged_decode_attention(dev, dtype, num_splits, gen):
    if dev == "cpu":
        lens, Hq, Hkv, D, bs, block_t = [1, 45, 130], 8, 2, 64, 16, 64
    else:
        lens, Hq, Hkv, D, bs, block_t = [1, 77, 1000, 4099, 8192], 32, 8, 128, 16, None  # measured defaults
    kc, vc, ks, vs, table = _filled_cache(lens, Hkv, D, bs, dtype, dev, gen)
    q = torch.randn(len(lens), Hq, D, generator=gen).to(torch.bfloat16).to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = torch.full_like(q, float("nan"))
    out = paged_decode_attention(q, kc, vc, table, seq_lens, D**-0.5, ks, vs, num_splits=num_splits,
                                 block_t=block_t)
    ref = R.paged_decode_attention_ref(q, kc, vc, table, seq_lens, D**-0.5, ks, vs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("order", ["rising", "falling", "shuffled"])
def test_fp8_attention_v_scales_across_tiles(dev, order, gen):
    """V's per-token scales spanning seven decades across the tiles of one split: the kernel holds its accumulator
    in units of the largest V scale seen so far and rescales it when a larger one arrives (in any order)."""
    lens, Hq, Hkv, D, bs = [70, 200], 8, 2, 64, 16
    kc, vc, ks, vs, table = _filled_cache(lens, Hkv, D, bs, torch.float8_e4m3fn, dev, gen)
    decades = torch.linspace(-4.0, 3.0, vs.shape[0])
    if order == "falling":
        decades = decades.flip(0)
    elif order == "shuffled":
        decades = decades[torch.randperm(vs.shape[0], generator=gen)]
    # one decade per cache block; the block table maps each sequence's tokens to shuffled blocks
    vs = vs * (10.0 ** decades).to(dev)[:, None, None]
    q = torch.randn(len(lens), Hq, D, generator=gen).to(torch.bfloat16).to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    ref = R.paged_decode_attention_ref(q, kc, vc, table, seq_lens, D**-0.5, ks, vs)
    for num_splits in (1, 2):
        out = paged_decode_attention(q, kc, vc, table, seq_lens, D**-0.5, ks, vs, num_splits=num_splits, block_t=32)
        assert rel_err(out, ref) < 4e-3


def test_attention_rejects_bad_inputs():
    q = torch.randn(2, 6, 32).to(torch.bfloat16)
    kc = torch.zeros(4, 8, 4, 32).to(torch.bfloat16)
    with pytest.raises(KernelInputError, match="multiple of KV heads"):
        paged_decode_attention(q, kc, kc, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0)
    kc8 = kc.to(torch.float8_e4m3fn)
    q = torch.randn(2, 8, 32).to(torch.bfloat16)
    with pytest.raises(KernelInputError, match="k_scale"):
        paged_decode_attention(q, kc8, kc8, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0)


def test_split_count_policy():
    """Enough programs for the GPU at small batch, never splits shorter than 2 x BLOCK_T, at most MAX_SPLITS, and
    large batches unsplit or barely split."""
    from workers.kernels.attention import MAX_SPLITS, choose_num_splits

    assert choose_num_splits(1, 8, 8192, 32, 132, num_warps=1) == 128  # 1056 programs wanted, 128 splits of 64
    assert choose_num_splits(1, 8, 2048, 32, 132, num_warps=1) == 32  # capped: 32 splits of 64 tokens
    assert choose_num_splits(64, 8, 2048, 32, 132, num_warps=1) == 2
    for batch, ctx, bt, warps in [(1, 100_000, 32, 1), (2, 8192, 64, 2), (1, 64, 32, 1), (128, 512, 32, 1)]:
        n = choose_num_splits(batch, 8, ctx, bt, 132, num_warps=warps)
        assert 1 <= n <= MAX_SPLITS and (n == 1 or ctx / n >= 2 * bt)


def test_attention_fit_separates_fixed_and_per_token_cost():
    """bench_suite.attention_fit (the B=1 per-KV-token figure of bench_kernels): a least-squares line per KV dtype
    over the batch's contexts >= 2K; other batches and shorter contexts are ignored."""
    from workers.kernels.bench_suite import attention_fit

    rows = [dict(B=1, ctx=c, fp8_us=9.0 + 0.0005 * c + (0.01 if c == 8192 else 0.0), bf16_us=10.0 + 0.001 * c)
            for c in (1024, 2048, 4096, 8192, 32768)]
    rows += [dict(B=16, ctx=8192, fp8_us=1.0, bf16_us=1.0), dict(B=1, ctx=512, fp8_us=99.0, bf16_us=1.0)]
    fit = attention_fit(rows)
    assert fit is not None and fit["points"] == 4
    assert abs(fit["bf16_fixed_us"] - 10.0) < 1e-9 and abs(fit["bf16_ns_per_token"] - 1.0) < 1e-9
    assert abs(fit["fp8_fixed_us"] - 9.0) < 0.01 and abs(fit["per_token_fp8_over_bf16"] - 0.5) < 1e-3
    assert attention_fit(rows[:2]) is None  # fewer than three contexts: no fit

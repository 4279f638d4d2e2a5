"""The ops seam (backend registry), the reference paged attention, the allocator and sampling."""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.types import KVDtype, SamplingParams
from workers.engine import ops
from workers.engine.errors import EngineCapacityError, KVLeakError
from workers.engine.kv_cache import BlockAllocator, PagedKVCache
from workers.engine.sampling import filtered_probs, sample_token

from .factories import greedy, make_engine, prompts


def test_registry_picks_backend_by_device_priority_and_name():
    marker = object()

    def fake_norm(x, w, eps):
        return marker

    ops.register_backend("low", {"rms_norm": fake_norm}, device_type="fakedev", priority=1)
    ops.register_backend("high", {"silu_mul": fake_norm}, device_type="fakedev", priority=5)
    try:
        best = ops.get_ops("cpu")
        assert best is ops.REFERENCE_OPS  # nothing registered for cpu
        chosen = ops.get_ops("cpu", backend="low")
        assert chosen.backend == "low" and chosen.rms_norm is fake_norm and chosen.silu_mul is ops.silu_mul
        assert ops.get_ops("cpu", backend="reference") is ops.REFERENCE_OPS
        assert ops.registered_backends()["high"] == "fakedev"
        with pytest.raises(ValueError, match="unknown op name"):
            ops.register_backend("bad", {"matmul": fake_norm})
        with pytest.raises(ValueError, match="built-in"):
            ops.register_backend("reference", {})
    finally:
        ops.unregister_backend("low")
        ops.unregister_backend("high")


@pytest.mark.parametrize("kv_dtype", list(KVDtype), ids=lambda k: k.value)
def test_paged_decode_attention_equals_dense_attention(kv_dtype):
    torch.manual_seed(0)
    hk, d, bs, heads = 2, 16, 4, 4
    cache = PagedKVCache(1, 12, bs, hk, d, kv_dtype, torch.device("cpu"))
    lens = [5, 9, 1]
    tables, ks, vs = [], [], []
    for n in lens:
        blocks = cache.allocator.allocate((n + bs - 1) // bs)[::-1]  # non-contiguous, reversed blocks
        k, v = torch.randn(n, hk, d), torch.randn(n, hk, d)
        kc, vc, kss, vss = cache.layer(0)
        ops.kv_write(kc, vc, kss, vss, cache.slots(blocks, 0, n), k, v, kv_dtype)
        tables.append(blocks)
        ks.append(k)
        vs.append(v)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(3, heads, d)
    kc, vc, kss, vss = cache.layer(0)
    out = ops.paged_attention_decode(q, kc, vc, kss, vss, bt, torch.tensor(lens), d**-0.5)
    tol = {KVDtype.BF16: 0.02, KVDtype.FP8_E4M3: 0.1, KVDtype.FP8_E5M2: 0.2}[kv_dtype]
    for i in range(len(lens)):
        k = ks[i].repeat_interleave(2, dim=1)
        v = vs[i].repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i], k) * d**-0.5, -1)
        ref = torch.einsum("ht,thd->hd", p, v)
        assert float((out[i] - ref).abs().max()) < tol
        assert not torch.equal(out[i], out[(i + 1) % 3])


def test_allocator_refcounts_and_errors():
    a = BlockAllocator(4)
    x = a.allocate(3)
    with pytest.raises(EngineCapacityError):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocation takes nothing
    a.incref(x[:1])
    a.free(x)
    assert a.held() == [x[0]] and a.num_free == 3
    a.free(x[:1])
    assert a.num_free == 4
    with pytest.raises(KVLeakError, match="double free"):
        a.free(x[:1])


def test_sampling_filters_and_seeds():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])
    probs, ids = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert ids.tolist() == [1, 4, 2] and float(probs.sum()) == pytest.approx(1.0)
    probs, ids = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert ids.tolist() == [1, 4]
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=1.0, top_k=1), 0, gen) == 1
    seeded = SamplingParams(temperature=1.0, seed=5)
    draws = [sample_token(logits, seeded, pos, gen) for pos in range(400)]
    assert draws == [sample_token(logits, seeded, pos, gen) for pos in range(400)]  # (seed, position) only
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 400
    assert torch.allclose(freq, torch.softmax(logits, -1), atol=0.07)


def test_engine_seeded_sampling_repeats_and_seeds_differ():
    eng = make_engine()
    p = prompts(1)[0]
    s1 = SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
    s2 = SamplingParams(max_tokens=12, temperature=1.0, seed=2, ignore_eos=True)
    a, b = eng.generate([p], s1)[0], eng.generate([p], s1)[0]
    assert a == b and a != eng.generate([p], s2)[0] and a != eng.generate([p], greedy(12))[0]


@pytest.mark.slow  # ~6-10 s: the 1B shape's 128256 x 2048 embedding is generated even with one layer
def test_bf16_compute_and_shape_preset_build_lazily():
    eng = make_engine(dtype="bf16", model="llama-3.2-1b-shape", num_layers=1, num_blocks=4, max_model_len=64)
    assert eng.model_config.vocab_size == 128256 and eng.model_config.num_layers == 1
    assert dict(eng.kv_layout.rope_scaling)["rope_type"] == "llama3"
    assert len(eng.generate([prompts(1)[0]], greedy(3))[0]) == 3

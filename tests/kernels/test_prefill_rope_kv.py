"""Prefill RoPE + K/V cache write in one launch (`engine_backend.prefill_rope_kv`), and the engine using it.

The contract (workers/engine/ops.py): q and k rotated in the activation dtype, v contiguous, and with a cache
the slots hold exactly `quantize_kv(k)`, `quantize_kv(v)` of the k, v returned — so a colocated prefill and a
KV export (which quantizes what the model hands it) store identical bytes.
"""

import pytest
import torch

from orchestrator.core.types import ComputeDtype, KVDtype, LinearMode, SamplingParams
from tests.kernels.conftest import DEVICES, rel_err
from workers.engine import ops
from workers.kernels import engine_backend as eb

_STORE = {KVDtype.FP8_E4M3: torch.float8_e4m3fn, KVDtype.BF16: torch.bfloat16}


def _caches(kv_dtype, nb, bs, hk, d, dev, gen):
    """Caches filled with a random (non-zero) poison, so unwritten slots are recognisable."""
    store = _STORE[kv_dtype]
    kv = [(torch.rand(nb, bs, hk, d, generator=gen) + 0.5).to(store).to(dev) for _ in range(2)]
    sc = [(torch.rand(nb, bs, hk, generator=gen) + 0.5).to(dev) for _ in range(2)] if store != torch.bfloat16 \
        else [None, None]
    return kv + sc


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kv_dtype", [KVDtype.FP8_E4M3, KVDtype.BF16], ids=lambda k: k.value)
def test_prefill_rope_kv_adapter(dev, kv_dtype, gen):
    R = ops.REFERENCE_OPS
    T, Hq, Hkv, D, bs, nb = (13, 4, 2, 32, 8, 4) if dev == "cpu" else (300, 32, 8, 128, 16, 24)
    qkv = (3 * torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen)).to(torch.bfloat16).to(dev)
    pos = torch.arange(T, device=dev)
    inv_freq = (1.0 / 500000 ** (torch.arange(0, D, 2).float() / D)).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(dev)
    mine, ref = _caches(kv_dtype, nb, bs, Hkv, D, dev, gen), _caches(kv_dtype, nb, bs, Hkv, D, dev, gen)
    poison = [None if c is None else c.clone() for c in mine]
    q, k, v = eb.prefill_rope_kv(qkv, pos, inv_freq, Hq, tuple(mine), slots, kv_dtype)
    qr, kr, vr = R.prefill_rope_kv(qkv, pos, inv_freq, Hq, tuple(ref), slots, kv_dtype)
    assert q.shape == (T, Hq, D) and k.shape == v.shape == (T, Hkv, D) and v.is_contiguous()
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert rel_err(q, qr) < 8e-3 and rel_err(k, kr) < 8e-3  # the reference rounds cos/sin to bf16
    assert torch.equal(v, vr)
    # the cache holds exactly quantize_kv of the returned k, v (what an export would hand out)
    for cache, scale, x in ((mine[0], mine[2], k), (mine[1], mine[3], v)):
        xq, xs = eb.quantize_kv(x, kv_dtype)
        flat = cache.view(-1, Hkv, D)
        assert torch.equal(_bits(flat[slots]), _bits(xq))
        if scale is not None:
            assert torch.equal(scale.view(-1, Hkv)[slots], xs)
    for m, r in zip(mine, ref, strict=True):  # and agrees with the engine's torch path up to rounding
        if m is not None:
            rows = (lambda c: c.reshape(nb * bs, -1)[slots].float())  # noqa: E731
            assert rel_err(rows(m), rows(r)) < 0.03
    untouched = torch.ones(nb * bs, dtype=torch.bool, device=dev)
    untouched[slots] = False
    for m, p in zip(mine, poison, strict=True):  # slots not named keep their poison, bit for bit
        if m is not None:
            assert torch.equal(m.reshape(nb * bs, -1)[untouched].view(torch.uint8),
                               p.reshape(nb * bs, -1)[untouched].view(torch.uint8))
    # no cache (export / logits only): the same q, k, v and nothing written
    q2, k2, v2 = eb.prefill_rope_kv(qkv, pos, inv_freq, Hq, None, None, kv_dtype)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert ops.get_ops("cpu", backend=eb.BACKEND_NAME).prefill_rope_kv is eb.prefill_rope_kv


def test_prefill_rope_kv_adapter_falls_back_for_odd_head_dim(gen):
    """head_dim 24 (not a power of two) goes to the engine's torch op: bit-identical results."""
    T, Hq, Hkv, D = 5, 2, 1, 24
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(torch.bfloat16)
    pos, inv_freq = torch.arange(T), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    got = eb.prefill_rope_kv(qkv, pos, inv_freq, Hq, None, None, KVDtype.BF16)
    want = ops.REFERENCE_OPS.prefill_rope_kv(qkv, pos, inv_freq, Hq, None, None, KVDtype.BF16)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _engine_backends():
    return [
        pytest.param("cpu", "reference", id="cpu-reference"),
        pytest.param("cpu", eb.BACKEND_NAME, id="cpu-triton",
                     marks=DEVICES[0].marks),  # the interpreter
        pytest.param("cuda", None, id="cuda-triton", marks=pytest.mark.gpu),
    ]


@pytest.mark.parametrize(("dev", "backend"), _engine_backends())
@pytest.mark.parametrize("kv_dtype", [KVDtype.FP8_E4M3, KVDtype.BF16], ids=lambda k: k.value)
def test_colocated_prefill_cache_equals_export_bytes(dev, backend, kv_dtype):
    """The engine's prefill writes the cache through prefill_rope_kv; prefill_export quantizes what the model
    hands it. Both must hold the same bytes for the same prompt (disaggregation changes no token)."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine

    eng = Engine(EngineConfig(model="tiny", device=dev, dtype=ComputeDtype.BF16, linear_mode=LinearMode.BF16,
                              kv_dtype=kv_dtype, seed=11, num_blocks=32, block_size=8, ops_backend=backend,
                              cuda_graphs=False))
    if backend is None:
        assert eng.ops.backend == eb.BACKEND_NAME
    prompt = [(5 * i + 2) % 200 + 3 for i in range(37)]  # not a block multiple
    export = eng.prefill_export("e", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.add_request("c", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    (first,) = eng.step()  # the prefill: the request now holds its blocks
    assert first.token_id == export.first_token_id
    seq = eng._seqs["c"]
    slots = eng.cache.slots(seq.blocks, 0, len(prompt)).to(eng.device)
    for payload in export.layers:
        kc, vc, ks, vs = eng.cache.layer(payload.layer)
        hk, d = kc.shape[2], kc.shape[3]
        assert torch.equal(_bits(kc.view(-1, hk, d)[slots]), _bits(payload.k))
        assert torch.equal(_bits(vc.view(-1, hk, d)[slots]), _bits(payload.v))
        if ks is not None:
            assert torch.equal(ks.view(-1, hk)[slots], payload.k_scale)
            assert torch.equal(vs.view(-1, hk)[slots], payload.v_scale)
    eng.abort("c")
    eng.assert_no_leaks()

"""The vLLM <-> Tandem KV translation in pure torch (runs with or without vLLM installed).

The layout probe is checked against fake cache-write kernels with known packed orders (the real
vLLM kernels are probed in test_interop.py), and the FP8 scale translation against its definition.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVImportError, KVLayerPayload
from workers.vllm_engine.layout import VLLMPagedLayout, kv_dtype_of_vllm_cache

BS, H, D = 32, 2, 16


def _cache(num_blocks: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(num_blocks, H, BS, 2 * D, dtype=dtype)


def _plain_write(k, v, kc, vc, slots):
    b, off = slots // BS, slots % BS
    kc[b, :, off] = k.to(kc.dtype)
    vc[b, :, off] = v.to(vc.dtype)


def test_plain_layout_round_trips_random_slots():
    lay = VLLMPagedLayout.plain(BS, H, D, KVDtype.BF16)
    cache = _cache(5)
    slots = torch.randperm(5 * BS)[:77]
    k, v = torch.randn(77, H, D), torch.randn(77, H, D)
    lay.scatter(cache, slots, k, v)
    gk, gv = lay.gather(cache, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    # the plain order is the one vLLM's kernels read: K rows then V rows of each (block, head)
    view = cache.view(5, H, 2 * BS, D)
    b, o = slots // BS, slots % BS
    assert torch.equal(view[b, :, o], k) and torch.equal(view[b, :, BS + o], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_learns_a_packed_order(dtype):
    def write(k, v, kc, vc, slots):
        # the probe hands views of a [2, H, BS, 2D] cache, like vLLM's chunk of the [B, H, 2BS, D] view
        full = kc.as_strided((kc.shape[0], H, 2 * BS, D), kc.stride())
        vv = full[:, :, BS:]
        b, off = slots // BS, slots % BS
        # K packed like a VNNI layout: dim pair j of token t at flat index (j*BS + t)*2 + (d % 2)
        half = full[:, :, :BS].reshape(full.shape[0], H, BS * D)
        packed = k.to(dtype).view(-1, H, D // 2, 2)
        for t in range(len(slots)):
            for j in range(D // 2):
                half_idx = (j * BS + int(off[t])) * 2
                half[int(b[t]), :, half_idx: half_idx + 2] = packed[t, :, j]
        full[:, :, :BS] = half.view(full.shape[0], H, BS, D)
        vv[b, :, off] = v.to(dtype)

    lay = VLLMPagedLayout.probe(write, BS, H, D, KVDtype.BF16, dtype)
    assert not torch.equal(lay.k_index, VLLMPagedLayout.plain(BS, H, D, KVDtype.BF16).k_index)
    cache = _cache(3, dtype)
    view = cache.view(3, H, 2 * BS, D)
    slots = torch.tensor([0, 5, 33, 70, 95])
    k = torch.randn(5, H, D).to(dtype)
    v = torch.randn(5, H, D).to(dtype)
    write(k, v, view[:, :, :BS], view[:, :, BS:], slots)
    gk, gv = lay.gather(cache, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    other = _cache(3, dtype)
    lay.scatter(other, slots, k, v)
    assert torch.equal(other, cache), "scatter must reproduce the kernel's bytes exactly"


def test_probe_rejects_a_write_that_drops_elements():
    def lossy(k, v, kc, vc, slots):
        _plain_write(k, v, kc, vc, slots)
        kc[:, :, 3] = 0  # token offset 3 never stored

    with pytest.raises(KVImportError, match="permutation|drops"):
        VLLMPagedLayout.probe(lossy, BS, H, D, KVDtype.BF16, torch.float32)


def test_bf16_cache_leaves_as_bf16_payload():
    lay = VLLMPagedLayout.plain(BS, H, D, KVDtype.BF16)
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    p = lay.to_payload(3, 10, k, v, 1.0, 1.0)
    assert p.layer == 3 and p.token_start == 10 and p.k.dtype == torch.bfloat16 and p.k_scale is None
    k2, v2 = lay.from_payload(p, torch.float32, 1.0, 1.0)
    assert k2.dtype == torch.float32 and torch.equal(k2, k.to(torch.bfloat16).float())


def test_fp8_per_tensor_scales_translate_to_per_token_head_and_back():
    lay = VLLMPagedLayout.plain(BS, H, D, KVDtype.FP8_E4M3)
    x = torch.randn(6, H, D)
    kq = (x / 0.25).to(torch.float8_e4m3fn)  # vLLM's cache: q = x / k_scale
    p = lay.to_payload(0, 0, kq, kq, 0.25, 0.5)
    assert p.k.dtype == torch.float8_e4m3fn and torch.equal(p.k_scale, torch.full((6, H), 0.25))
    assert torch.equal(p.v_scale, torch.full((6, H), 0.5))
    # wire payload with per-(token, head) scales -> a vLLM FP8 cache with its own per-layer scale
    scale = torch.rand(6, H) + 0.1
    wire = KVLayerPayload(0, 0, (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), kq, scale, torch.full((6, H), 0.25))
    k8, v8 = lay.from_payload(wire, torch.uint8, 0.05, 0.25)
    assert k8.dtype == torch.uint8
    back = k8.view(torch.float8_e4m3fn).float() * 0.05
    exact = wire.k.float() * scale.unsqueeze(-1)
    big = back.abs().max()
    assert torch.allclose(back, exact.clamp(-448 * 0.05, 448 * 0.05), rtol=0.13, atol=1e-3 * float(big))
    assert float(back.abs().max()) <= 448 * 0.05 + 1e-6  # saturated, never inf/nan
    assert torch.isfinite(back).all()


def test_cache_dtype_names_and_shape_check():
    assert kv_dtype_of_vllm_cache("auto") is KVDtype.BF16
    assert kv_dtype_of_vllm_cache("fp8") is KVDtype.FP8_E4M3
    assert kv_dtype_of_vllm_cache("fp8_e5m2") is KVDtype.FP8_E5M2
    with pytest.raises(KVImportError, match="no Tandem wire equivalent"):
        kv_dtype_of_vllm_cache("int4")
    lay = VLLMPagedLayout.plain(BS, H, D, KVDtype.BF16)
    with pytest.raises(KVImportError, match="not the CPU layout"):
        lay.gather(torch.zeros(2, H, BS, D), torch.tensor([0]))
    with pytest.raises(KVImportError, match="more than the 1 blocks"):
        lay.slots([4], 0, BS + 1)


def test_engine_vllm_pool_option_and_its_checks(tmp_path):
    import yaml

    from orchestrator.config import ConfigError, load_config
    from orchestrator.core.types import EngineKind
    from tests.vllm.configs import pool, serving_config
    from workers.vllm_engine.config import VLLMConfigError, VLLMEngineConfig

    cfg = serving_config(tmp_path, [pool("p", "prefill", "vllm"), pool("d", "decode", "native")], tmp_path / "a.yaml")
    assert [p.engine.kind for p in cfg.pools] == [EngineKind.VLLM, EngineKind.NATIVE]
    doc = yaml.safe_load((tmp_path / "a.yaml").read_text())
    doc["pools"][0]["engine"] = "vllm"  # the shorthand
    doc["model"]["block_size"] = 16
    doc["model"]["path"] = None
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "b.yaml")
    msg = str(err.value)
    assert "pools[0].engine.block_size" in msg and "multiple of 32" in msg
    assert "pools[0].engine.kind" in msg and "model.path" in msg
    with pytest.raises(VLLMConfigError, match="multiple of 32"):
        VLLMEngineConfig(model="x", block_size=48)
    c = VLLMEngineConfig.from_engine_kwargs("m", {"block_size": 64, "linear_mode": "fp8-dynamic", "num_blocks": 9})
    assert (c.block_size, c.num_blocks, c.vllm_cache_dtype) == (64, 9, "auto")

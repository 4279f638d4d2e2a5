"""FP8 primitives and acceptance 3 on the tiny model: error per mode vs the non-FP8 baseline, bounded."""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.types import FP8Format, KVDtype, LinearMode, Rounding
from workers.engine import EngineConfig
from workers.engine import fp8 as fp8q
from workers.engine.fp8_error import eval_prompts, kv_errors, linear_mode_errors
from workers.engine.model import Linear
from workers.engine.ops import REFERENCE_OPS

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=["e4m3", "e5m2"])
def test_round_to_nearest_matches_torch_cast_and_saturates(dtype):
    x = torch.randn(1000) * 100
    x[:4] = torch.tensor([1e6, -1e6, 0.0, -0.0])
    q = fp8q.round_to_fp8(x, dtype)
    fmax = fp8q.fp8_max(dtype)
    assert q.dtype == dtype and torch.isfinite(q.float()).all()
    assert q[0].item() == fmax and q[1].item() == -fmax
    assert torch.equal(q.float()[4:], x[4:].clamp(-fmax, fmax).to(dtype).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=["e4m3", "e5m2"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    x = torch.tensor([0.3, -1.37, 3.3, 100.7, -0.011, 0.0])
    draws = 4000
    reps = x.repeat(draws, 1)
    noise = fp8q.hash_uniform(torch.arange(draws), x.numel(), salt=3)
    q = fp8q.round_to_fp8(reps, dtype, Rounding.STOCHASTIC, noise).float()
    for j in range(x.numel()):
        vals = set(q[:, j].tolist())
        assert len(vals) <= 2, vals  # only the two FP8 neighbours
        if x[j] != 0 and x[j].to(dtype).float() != x[j]:
            assert len(vals) == 2
    mean = q.mean(0)
    spread = (q.max(0).values - q.min(0).values).clamp_min(1e-9)
    assert ((mean - x).abs() / spread).max() < 0.05  # unbiased within sampling noise


def test_hash_noise_is_uniform_and_deterministic():
    u = fp8q.hash_uniform(torch.arange(512), 256, salt=1)
    assert torch.equal(u, fp8q.hash_uniform(torch.arange(512), 256, salt=1))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert not torch.equal(u, fp8q.hash_uniform(torch.arange(512), 256, salt=2))


@pytest.mark.parametrize(("kv_dtype", "bound"), [(KVDtype.FP8_E4M3, 2**-4), (KVDtype.FP8_E5M2, 2**-3)])
def test_kv_quantization_is_per_token_per_head(kv_dtype, bound):
    x = torch.randn(7, 3, 16) * torch.logspace(-3, 3, 7).reshape(7, 1, 1)  # wildly different token scales
    q, s = fp8q.quantize_kv(x, kv_dtype)
    assert s.shape == (7, 3) and s.dtype == torch.float32
    back = fp8q.dequantize_kv(q, s, torch.float32)
    rel = (back - x).abs() / x.abs().amax(-1, keepdim=True)
    assert float(rel.max()) <= bound  # half an ulp at the top of each token's range


@pytest.mark.parametrize("mode", [LinearMode.FP8_DYNAMIC, LinearMode.FP8_STATIC])
@pytest.mark.parametrize("fmt", [FP8Format.E4M3, FP8Format.E5M2])
def test_fp8_linear_is_an_exact_emulation(mode, fmt):
    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(5, 32)
    lin = Linear(w, None, mode, fmt, Rounding.NEAREST, torch.float32, 0, REFERENCE_OPS)
    if mode is LinearMode.FP8_STATIC:
        lin.calib_amax = 0.0
        lin(x, torch.arange(5))
        lin.finish_calibration()
        assert float(lin.act_scale) == pytest.approx(float(x.abs().max()) / fp8q.fp8_max(lin.fp8_dtype))
        xq = fp8q.quantize_with_scale(x, lin.act_scale, lin.fp8_dtype).float() * lin.act_scale
        assert lin.w_scale.numel() == 1
    else:
        q, s = fp8q.quantize_per_row(x, lin.fp8_dtype)
        xq = q.float() * s
        assert lin.w_scale.shape == (48,)
    wq = lin.w_q.float() * lin.w_scale.reshape(-1, 1)
    expected = xq.double() @ wq.double().t()
    got = lin(x, torch.arange(5))
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert float((got - x @ w.t()).norm() / (x @ w.t()).norm()) < (0.1 if fmt is FP8Format.E4M3 else 0.2)


def test_fp8_error_per_mode_on_tiny_is_bounded():
    base = EngineConfig(num_blocks=32)
    rows = {(r["linear"], r["format"], r["rounding"]): r for r in linear_mode_errors(base, eval_prompts(259, 3))}
    assert len(rows) == 9
    bf16 = rows[("bf16 (bf16 compute)", "-", "-")]
    assert bf16["rel_logit_err"] < 0.02 and bf16["top1_agreement"] >= 0.95
    for (mode, fmt, rnd), r in rows.items():
        if mode.startswith("fp8"):
            assert 0.0 < r["rel_logit_err"] < 0.3, (mode, fmt, rnd, r)
            assert r["top1_agreement"] >= 0.6, (mode, fmt, rnd, r)
            assert r["rel_logit_err"] > bf16["rel_logit_err"]
    for mode in ("fp8-dynamic", "fp8-static"):
        e4 = rows[(mode, "e4m3", "nearest")]
        assert e4["rel_logit_err"] < 0.1 and e4["top1_agreement"] >= 0.8
        assert rows[(mode, "e5m2", "nearest")]["rel_logit_err"] > e4["rel_logit_err"]  # E4M3 is the better format


def test_kv_roundtrip_error_on_tiny_is_bounded():
    rows = {r["kv_dtype"]: r for r in kv_errors(EngineConfig(num_blocks=32), eval_prompts(259, 2), 16)}
    assert rows["bf16"]["kv_rel_err"] < 0.004
    assert rows["bf16"]["greedy_tokens_matching_bf16_kv"] == 16
    assert 0.0 < rows["fp8_e4m3"]["kv_rel_err"] < 0.04
    assert rows["fp8_e4m3"]["kv_rel_err"] < rows["fp8_e5m2"]["kv_rel_err"] < 0.08

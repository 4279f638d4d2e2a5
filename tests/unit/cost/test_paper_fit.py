"""Issue 5, point 3: the cost model against the seed paper, out of sample.

The GEMM curves of H100 and Gaudi 2 are fitted on the train split of the paper's Tables 1, 4, 8, 9
(cluster_configs/hardware/measurements/paper-002-gemm.yaml: thin M in {8, 64}, squares 2K and 8K)
and must predict the held-out points (thin M in {16, 32}, squares 1K and 4K) within 10%.
The points an honest model cannot reach are listed below with the error it makes, not tuned away.
Then the paper's qualitative findings must come out of the fitted model (not from a lookup).
"""

from __future__ import annotations

import pytest

from orchestrator.core.cost_model import CostModel
from orchestrator.core.gemm_fit import catalog_with_fits, evaluate, fit_split, load_gemm_measurements
from orchestrator.core.hardware import GemmKind
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import KVDtype, LinearMode

TOLERANCE = 0.10
# (device, kind, M, K, source) -> relative error the fitted model makes (measured with
# scripts/calibrate_paper.py). Why each cannot be met honestly:
KNOWN_MISSES = {
    # Table 4 noise: Gaudi 2 bf16 (16,2048,2048) runs in 3.26 us, slower than both M=8 (2.71 us) and M=32 (2.80 us).
    ("gaudi2", GemmKind.BF16, 16, 2048, "paper Table 4"): +0.197,
    # Table 4: Gaudi 2 fp8 (32,2048,2048) is 3.06 us between 2.57 us (M=8) and 3.29 us (M=64); the fit (floor +
    # streaming) puts M=32 at ~2.75 us.
    ("gaudi2", GemmKind.FP8_ROWWISE, 32, 2048, "paper Table 4"): +0.115,
    # Gaudi 2 squares: Tables 1 and 8 measure the same row-wise GEMM and disagree (1K: 367.9 vs 494, 2K: 586 vs
    # 506, 4K: 817 vs 735 TFLOPS), and Table 1's 4K (94.5% of peak) is above its own 8K (85.8%): no curve that
    # saturates with size can be fitted on 2K/8K and meet both tables at 1K and 4K.
    ("gaudi2", GemmKind.FP8_ROWWISE, 1024, 1024, "paper Table 1"): -0.172,
    ("gaudi2", GemmKind.FP8_ROWWISE, 4096, 4096, "paper Table 1"): -0.158,
    ("gaudi2", GemmKind.FP8_ROWWISE, 1024, 1024, "paper Table 8 (E4M3 per-row)"): -0.383,
    # H100 Table 1: 4K (58.7% of peak) above 8K (54.5%, power-capped: the reference power JSON shows the clock
    # at 1.38 GHz); Table 9 measures the same GEMM at 1136 and is met (-8.7%).
    ("h100-sxm", GemmKind.FP8_ROWWISE, 4096, 4096, "paper Table 1"): -0.112,
    # Per-tensor 1K: Gaudi 2 runs per-tensor at the per-row rate (494, Table 8) while H100 per-tensor 1K (147) is
    # slower than its per-row 1K (237): both are far from what 2K/8K squares imply.
    ("gaudi2", GemmKind.FP8_TENSOR, 1024, 1024, "paper Table 8 (E4M3 per-tensor)"): -0.349,
    ("h100-sxm", GemmKind.FP8_TENSOR, 1024, 1024, "paper Table 9 (fast accum, per-tensor)"): +0.422,
}


@pytest.fixture(scope="module")
def fitted(catalog):
    points = load_gemm_measurements()
    fits = fit_split(points, catalog, splits=("train",))
    return points, fits


@pytest.fixture(scope="module", params=["train-split fit", "shipped catalog"])
def fitted_cost(request, catalog, fitted) -> CostModel:
    """The 8B cost model whose H100 and Gaudi 2 GEMM curves come only from the train split — and the
    shipped catalog's (fitted on all of the paper's points), which the router and simulator use."""
    if request.param == "shipped catalog":
        return CostModel(PRESETS["llama-3.1-8b-shape"], catalog)
    _, fits = fitted
    cat = catalog_with_fits(catalog, fits)
    assert cat["gaudi2"].gemm[GemmKind.FP8_ROWWISE] is fits[("gaudi2", GemmKind.FP8_ROWWISE)]
    return CostModel(PRESETS["llama-3.1-8b-shape"], cat)


def test_train_split_never_sees_held_out_points(fitted):
    points, _ = fitted
    held = [p for p in points if p.split == "held-out"]
    train = [p for p in points if p.split == "train"]
    assert len(held) == 36 and len(train) == 36
    assert not {(p.device, p.kind, p.m, p.k, p.source) for p in held} & {
        (p.device, p.kind, p.m, p.k, p.source) for p in train
    }


def test_held_out_shapes_predicted_within_10_percent(catalog, fitted):
    points, fits = fitted
    rows = [r for r in evaluate(points, fits, catalog) if r.point.split == "held-out"]
    assert len(rows) == 36
    failures = []
    for r in rows:
        p = r.point
        key = (p.device, p.kind, p.m, p.k, p.source)
        if key in KNOWN_MISSES:
            # documented miss: the model must still make (about) the error reported, not drift silently
            if abs(r.error - KNOWN_MISSES[key]) > 0.03:
                failures.append(f"{key}: error {r.error:+.1%}, documented {KNOWN_MISSES[key]:+.1%}")
        elif abs(r.error) > TOLERANCE:
            failures.append(f"{key}: measured {p.tflops} predicted {r.predicted_tflops:.1f} ({r.error:+.1%})")
    assert not failures, "\n".join(failures)
    within = sum(abs(r.error) <= TOLERANCE for r in rows)
    assert within == len(rows) - len(KNOWN_MISSES) == 28
    # every held-out thin GEMM of the H100 (the decode shapes) is met
    assert all(abs(r.error) <= TOLERANCE for r in rows if r.point.device == "h100-sxm" and r.point.m <= 64)


def _tflops(cost: CostModel, hw: str, m: int, k: int, n: int, kind: GemmKind) -> float:
    return 2.0 * m * k * n / cost.gemm_time_s(hw, m, k, n, kind) / 1e12


@pytest.mark.parametrize(
    "shape,kinds",
    [
        ((64, 4096, 4096), (GemmKind.FP8_ROWWISE, GemmKind.BF16)),
        ((16, 4096, 6144), (GemmKind.FP8_ROWWISE, GemmKind.BF16)),
        ((48, 2048, 8192), (GemmKind.FP8_ROWWISE, GemmKind.BF16)),
        # Beyond the paper's sizes only fp8 is asserted: with 235 MB of bf16 weights the fitted H100 bf16
        # streaming rate (3.6 TB/s, fitted on 4096^2 weights that sit in its 50 MB L2) beats Gaudi 2's.
        ((64, 4096, 28672), (GemmKind.FP8_ROWWISE,)),
        ((32, 14336, 4096), (GemmKind.FP8_ROWWISE,)),
    ],
)
def test_gaudi2_ahead_on_thin_gemms(fitted_cost, shape, kinds):
    """Paper Table 4 / Fig. 5: thin GEMMs run faster on Gaudi 2 (predicted, shapes beyond the table too)."""
    for kind in kinds:
        g = _tflops(fitted_cost, "gaudi2", *shape, kind)
        h = _tflops(fitted_cost, "h100-sxm", *shape, kind)
        assert g > h, f"{shape} {kind.value}: gaudi2 {g:.1f} vs h100 {h:.1f} TFLOPS"


def test_h100_ahead_on_big_gemms_and_prefill(fitted_cost):
    """Paper Table 1 / Fig. 3: the H100 wins big GEMMs, and prefill, by about 2x for Llama 8B."""
    for s in (4096, 8192):
        assert _tflops(fitted_cost, "h100-sxm", s, s, s, GemmKind.FP8_ROWWISE) > _tflops(
            fitted_cost, "gaudi2", s, s, s, GemmKind.FP8_ROWWISE
        )
    ratio = fitted_cost.prefill_time_s("gaudi2", 4096) / fitted_cost.prefill_time_s("h100-sxm", 4096)
    assert 1.4 < ratio < 3.0, ratio


def test_decode_gaudi2_ahead_at_short_context_h100_ahead_at_long(fitted_cost):
    """Paper Fig. 1 / sec. 5.4: Gaudi 2 decodes faster below ~4K tokens (thin GEMMs); at long context the
    KV reads dominate and the H100's bandwidth (here 3.0 vs 2.0 TB/s measured) wins."""
    short = [512] * 64
    long_ = [32768] * 16
    assert fitted_cost.decode_step_time_s("gaudi2", short) < fitted_cost.decode_step_time_s("h100-sxm", short)
    assert fitted_cost.decode_step_time_s("h100-sxm", long_) < fitted_cost.decode_step_time_s("gaudi2", long_)


def test_fp8_helps_gaudi2_decode_more_than_h100(fitted_cost):
    """Paper Fig. 4: fp8 over bf16 decode throughput at batch 64: >= ~50% on Gaudi 2, < 25% on H100."""
    batch = [1024] * 64

    def gain(hw: str) -> float:
        bf16 = fitted_cost.decode_step_time_s(hw, batch, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
        fp8 = fitted_cost.decode_step_time_s(hw, batch, linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=KVDtype.BF16)
        return bf16 / fp8 - 1.0

    assert gain("gaudi2") > gain("h100-sxm")
    assert gain("h100-sxm") < 0.25

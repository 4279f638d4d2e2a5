"""Calibration profiles: written from measurements, read back, and overriding the catalog's roofline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.calibration import (
    CalibrationProfile,
    overrides_from_measurements,
    points_from_measurements,
    profile_from_measurements,
)
from orchestrator.core.cost_model import CostModel
from orchestrator.core.gemm_fit import CalibrationError, predict_tflops
from orchestrator.core.hardware import GemmCurve, GemmKind, Phase
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import KVDtype

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = ROOT.parent / "shared" / "reference"

# A made-up device measurement in the reference layout, generated from a known curve: the fit must
# recover times close to it.
TRUE = GemmCurve(latency_s=4e-6, eff_max=0.6, half_size=1200, hill_n=2.5, stream_bw_tbps=1.5, floor_s=5e-6)


def _synthetic_doc(peak_fp8: float) -> dict:
    def tf(m, k, n):
        return 2 * m * k * n / TRUE.time_s(m, k, n, peak_fp8, 1) / 1e12

    return {
        "device": "synthetic",
        "copy_TBps": 2.2,
        "square_TFLOPS": [{"size": s, "fp8_rowwise": tf(s, s, s), "fp8_rowwise_with_unfused_quant": 1.0}
                          for s in (1024, 2048, 4096, 8192)],
        "thin": [{"M": m, "K": k, "N": n, "fp8_rowwise_TFLOPS": tf(m, k, n)}
                 for m in (1, 16, 64, 256) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096))],
    }


POWER = {"rows": [
    {"phase": "idle", "power_w": 80.0}, {"phase": "copy (memory-bound)", "power_w": 380.0},
    {"phase": "thin gemm fp8 M=64", "power_w": 640.0}, {"phase": "thin gemm fp8 M=16", "power_w": 560.0},
    {"phase": "gemm bf16 8192^3", "power_w": 699.0}, {"phase": "gemm fp8 8192^3", "power_w": 690.0},
]}


def test_profile_fit_recovers_a_known_curve_and_overrides_the_catalog(catalog, tmp_path):
    peak = catalog["h100-sxm"].peak_tflops(GemmKind.FP8_ROWWISE)
    doc = _synthetic_doc(peak)
    points = points_from_measurements(doc, "h100-sxm", "synthetic.json")
    assert len(points) == 4 + 12  # the unfused-quant column is not a GEMM kind
    overrides = overrides_from_measurements(doc, POWER)
    assert overrides == {"measured_mem_bw_tbps": 2.2, "idle_w": 80.0, "prefill_power_w": 699.0, "decode_power_w": 640.0}
    prof = profile_from_measurements("h100-sxm", points, {k: peak for k in GemmKind}, overrides, source="synthetic")
    fitted = prof.devices["h100-sxm"].gemm[GemmKind.FP8_ROWWISE]
    for p in points:
        assert predict_tflops(fitted, p, peak) == pytest.approx(p.tflops, rel=0.05)

    path = tmp_path / "p.json"
    prof.save(path)
    back = CalibrationProfile.load(path)
    assert back.devices["h100-sxm"].gemm[GemmKind.FP8_ROWWISE] == fitted  # floats survive JSON exactly
    assert back.devices["h100-sxm"].overrides == overrides and len(back.devices["h100-sxm"].points) == 16

    model = PRESETS["llama-3.1-8b-shape"]
    plain = CostModel(model, catalog)
    calibrated = CostModel(model, catalog, profile=back)
    spec = calibrated.spec("h100-sxm")
    assert spec.measured_mem_bw_tbps == 2.2 and spec.idle_w == 80.0
    assert spec.sources["measured_mem_bw_tbps"].startswith("profile:")
    assert calibrated.power_w("h100-sxm", Phase.DECODE, 1.0) == 640.0
    # the profile's curve, not the catalog's, now times the GEMMs
    assert calibrated.gemm_time_s("h100-sxm", 64, 4096, 4096, GemmKind.FP8_ROWWISE) == pytest.approx(
        fitted.time_s(64, 4096, 4096, peak, 1)
    )
    assert calibrated.decode_step_time_s("h100-sxm", [4096] * 32) != plain.decode_step_time_s("h100-sxm", [4096] * 32)
    # untouched devices stay as they were
    assert calibrated.decode_step_time_s("gaudi2", [100]) == plain.decode_step_time_s("gaudi2", [100])
    # bf16 was not measured: its catalog curve stays
    assert calibrated.spec("h100-sxm").gemm[GemmKind.BF16] == catalog["h100-sxm"].gemm[GemmKind.BF16]


def test_bad_profiles_are_refused_with_typed_errors(catalog, tmp_path):
    base = {"format": "tandem-calibration/1", "devices": {"h100-sxm": {"overrides": {"idle_w": 70}}}}
    CalibrationProfile.from_json(base).apply(catalog)
    with pytest.raises(CalibrationError, match="tpu"):
        CalibrationProfile.from_json({**base, "devices": {"tpu": {}}}).apply(catalog)
    with pytest.raises(CalibrationError, match="cannot override 'tdp_w'"):
        CalibrationProfile.from_json({**base, "devices": {"h100-sxm": {"overrides": {"tdp_w": 1}}}})
    with pytest.raises(CalibrationError, match="non-negative"):
        CalibrationProfile.from_json({**base, "devices": {"h100-sxm": {"overrides": {"idle_w": -5}}}})
    with pytest.raises(CalibrationError, match="format"):
        CalibrationProfile.from_json({"devices": {}})
    with pytest.raises(CalibrationError, match="int4"):
        CalibrationProfile.from_json({**base, "devices": {"h100-sxm": {"gemm": {"int4": {}}}}})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="cannot read"):
        CalibrationProfile.load(tmp_path / "broken.json")


@pytest.mark.skipif(not (REFERENCE / "h100-baseline-2026-11-22.json").exists(), reason="../shared/reference absent")
def test_calibrate_hw_script_on_the_h100_reference(tmp_path, catalog):
    out = tmp_path / "h100.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "calibrate_hw.py"), "--device", "h100-sxm",
         "--measurements", str(REFERENCE / "h100-baseline-2026-11-22.json"),
         "--power", str(REFERENCE / "h100-power-2026-11-22.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "in-sample" in proc.stdout
    prof = CalibrationProfile.load(out)
    dev = prof.devices["h100-sxm"]
    assert set(dev.gemm) == {GemmKind.BF16, GemmKind.FP8_ROWWISE, GemmKind.FP8_TENSOR}
    assert dev.overrides["measured_mem_bw_tbps"] == pytest.approx(3.006, abs=1e-3)
    assert dev.overrides["idle_w"] == pytest.approx(72.79)
    ref = json.loads((REFERENCE / "h100-baseline-2026-11-22.json").read_text())
    # the profile predicts the measured 8K fp8 square within 10%
    sq8 = next(r for r in ref["square_TFLOPS"] if r["size"] == 8192)
    cm = CostModel(PRESETS["llama-3.1-8b-shape"], catalog, profile=prof)
    t = cm.gemm_time_s("h100-sxm", 8192, 8192, 8192, GemmKind.FP8_ROWWISE)
    assert 2 * 8192**3 / t / 1e12 == pytest.approx(sq8["fp8_rowwise"], rel=0.10)
    assert cm.kv_bytes(1, KVDtype.FP8_E4M3) == 67584


MEASURED = ROOT / "benchmarks" / "measurements" / "h100-gemm-graph-2026-11-22.json"
# Linear stacks the GEMM-fitted profile misses by more than 10% (error measured with
# scripts/calibrate_hw.py --check-stacks): at M=256 cuBLAS picks faster kernels for the model's
# shapes than the curve fitted over all shapes implies.
STACK_MISSES = {("bf16", 256): -0.165, ("fp8-static", 256): -0.115}


@pytest.fixture(scope="module")
def measured(catalog):
    """The profile fitted on the committed H100 GEMM sweep (CUDA-graph timed) and its measurement doc."""
    doc = json.loads(MEASURED.read_text())
    peak = {k: catalog["h100-sxm"].peak_tflops(k) for k in GemmKind}
    points = points_from_measurements(doc, "h100-sxm", MEASURED.name)
    prof = profile_from_measurements("h100-sxm", points, peak, overrides_from_measurements(doc), source="measured")
    return doc, prof


def test_measured_h100_gemms_predict_the_measured_linear_stacks(catalog, measured):
    """Out of sample in composition: curves fitted on isolated GEMMs (H100, CUDA-graph timed) predict
    the time of all 225 linear GEMMs of a Llama-8B forward step, measured back to back in one graph."""
    from orchestrator.core.types import LinearMode

    doc, prof = measured
    cm = CostModel(PRESETS[doc["stacks"]["model"]], catalog, profile=prof)
    rows = doc["stacks"]["rows"]
    assert len(rows) == 24
    for r in rows:
        mode, m = LinearMode(r["mode"]), int(r["m"])
        pred_ms = (cm.linear_time_s("h100-sxm", m, mode) + cm.lm_head_time_s("h100-sxm", m)) * 1e3
        err = pred_ms / r["ms"] - 1
        if (r["mode"], m) in STACK_MISSES:
            assert err == pytest.approx(STACK_MISSES[(r["mode"], m)], abs=0.03), (r, err)
        else:
            assert abs(err) <= 0.10, (r, pred_ms, err)


FORWARD = ROOT / "benchmarks" / "measurements" / "h100-forward-bf16-2026-11-22.json"


def _step_ms(cm: CostModel, st) -> float:  # noqa: ANN001
    from orchestrator.core.types import LinearMode

    o = cm.spec("h100-sxm").step_overhead_s
    if st.phase == "prefill":
        t = cm.prefill_time_s("h100-sxm", st.tokens, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
    else:
        t = cm.decode_step_time_s("h100-sxm", [st.context] * st.batch, linear_mode=LinearMode.BF16,
                                  kv_dtype=KVDtype.BF16)
    return (t - o) * 1e3


def test_non_gemm_fit_recovers_known_overheads(catalog):
    from orchestrator.core.calibration import ForwardStep, fit_non_gemm
    from orchestrator.core.types import LinearMode

    truth = {"prefill_layer_overhead_s": 2e-4, "decode_layer_overhead_s": 5e-5, "elementwise_factor": 2.5}
    true_cm = CostModel(PRESETS["llama-3.1-8b-shape"],
                        catalog.replace_spec(catalog["gaudi2"].with_overrides(**truth)))
    steps = [ForwardStep("prefill", 0.0, tokens=t) for t in (256, 2048, 8192)] + [
        ForwardStep("decode", 0.0, batch=b, context=c) for b, c in ((1, 500), (32, 4000), (128, 100))]
    o = true_cm.spec("gaudi2").step_overhead_s
    measured_steps = []
    for st in steps:
        if st.phase == "prefill":
            t = true_cm.prefill_time_s("gaudi2", st.tokens, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
        else:
            t = true_cm.decode_step_time_s("gaudi2", [st.context] * st.batch, linear_mode=LinearMode.BF16,
                                           kv_dtype=KVDtype.BF16)
        measured_steps.append(ForwardStep(st.phase, (t - o) * 1e3, st.tokens, st.batch, st.context))
    got = fit_non_gemm(CostModel(PRESETS["llama-3.1-8b-shape"], catalog), "gaudi2", measured_steps,
                       linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
    for k, v in truth.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k


def test_h100_forward_steps_held_out_after_non_gemm_fit(catalog, measured):
    """Whole bf16 forward steps measured on the H100 (plain torch, random weights): GEMM curves alone
    under-predict them by 14-47% (unfused norms/RoPE/SiLU and their launches); with the non-GEMM terms
    fitted on 4 train steps, the 4 held-out steps are predicted within 8%."""
    from orchestrator.core.calibration import DeviceCalibration, fit_non_gemm, forward_steps
    from orchestrator.core.types import LinearMode

    doc, prof = measured
    steps = forward_steps(json.loads(FORWARD.read_text()))
    assert sorted(s.split for s in steps) == ["held-out"] * 4 + ["train"] * 4
    gemm_only = CostModel(PRESETS["llama-3.1-8b-shape"], catalog, profile=prof)
    assert all(_step_ms(gemm_only, s) < s.ms for s in steps)  # GEMMs alone are too fast
    fitted = fit_non_gemm(gemm_only, "h100-sxm", [s for s in steps if s.split == "train"],
                          linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16)
    assert fitted["decode_layer_overhead_s"] > 0 and fitted["prefill_layer_overhead_s"] > 0
    assert fitted["elementwise_factor"] > 1
    dev = prof.devices["h100-sxm"]
    prof2 = CalibrationProfile({"h100-sxm": DeviceCalibration(dev.gemm, {**dev.overrides, **fitted})})
    full = CostModel(PRESETS["llama-3.1-8b-shape"], catalog, profile=prof2)
    for st in steps:
        err = _step_ms(full, st) / st.ms - 1
        assert abs(err) <= (0.05 if st.split == "train" else 0.08), (st, err)

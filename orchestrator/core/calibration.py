"""Calibration profiles: measured figures and fitted GEMM curves that override the catalog.

A *profile* (`CalibrationProfile`, JSON, format `tandem-calibration/1`) holds per device the fitted
curves and any measured figures that replace the catalog's (bandwidth, power, overheads):

    {"format": "tandem-calibration/1", "created": "...", "source": "...",
     "devices": {"h100-sxm": {"gemm": {"fp8_rowwise": {latency_s, eff_max, half_size, hill_n,
                                                        stream_bw_tbps, floor_s, source}, ...},
                              "overrides": {"measured_mem_bw_tbps": 3.01, "idle_w": 73, ...},
                              "points": [{"kind": ..., "m": ..., "k": ..., "n": ..., "tflops": ...}]}}}

`scripts/calibrate_hw.py` writes one from a measurement JSON; `CostModel(..., profile=...)` applies it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from orchestrator.core.gemm_fit import CalibrationError, GemmPoint
from orchestrator.core.hardware import GemmCurve, GemmKind, HardwareCatalog, HardwareSpec, UnknownHardware
from orchestrator.core.types import TandemError

PROFILE_FORMAT = "tandem-calibration/1"
# Catalog fields a profile may override (all plain numbers).
OVERRIDABLE = (
    "measured_mem_bw_tbps", "idle_w", "prefill_power_w", "decode_power_w", "step_overhead_s",
    "attention_efficiency", "prefill_layer_overhead_s", "decode_layer_overhead_s", "elementwise_factor",
)


# ------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class DeviceCalibration:
    gemm: Mapping[GemmKind, GemmCurve] = field(default_factory=dict)
    overrides: Mapping[str, float] = field(default_factory=dict)
    points: tuple[GemmPoint, ...] = ()


@dataclass(frozen=True)
class CalibrationProfile:
    """Per-device fitted curves and measured figures that replace the catalog's where present."""

    devices: Mapping[str, DeviceCalibration]
    source: str = ""
    created: str = ""

    def apply(self, catalog: HardwareCatalog) -> HardwareCatalog:
        """A catalog whose entries carry this profile's curves and figures (unknown device: error)."""
        out = catalog
        for key, dev in self.devices.items():
            try:
                spec: HardwareSpec = catalog[key]
            except UnknownHardware:
                raise CalibrationError(
                    f"profile calibrates {key!r}, which the hardware catalog does not hold "
                    f"(known: {', '.join(sorted(catalog))})"
                ) from None
            curves = dict(spec.gemm)
            curves.update(dev.gemm)
            sources = dict(spec.sources)
            for k, c in dev.gemm.items():
                sources[f"gemm.{k.value}"] = c.source or f"profile: {self.source}"
            for name in dev.overrides:
                sources[name] = f"profile: {self.source}"
            out = out.replace_spec(
                spec.with_overrides(
                    gemm=MappingProxyType(curves), sources=MappingProxyType(sources), **dict(dev.overrides)
                )
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "created": self.created,
            "source": self.source,
            "devices": {
                key: {
                    "gemm": {k.value: c.as_dict() for k, c in dev.gemm.items()},
                    "overrides": dict(dev.overrides),
                    "points": [
                        {"kind": p.kind.value, "m": p.m, "k": p.k, "n": p.n, "tflops": p.tflops, "source": p.source}
                        for p in dev.points
                    ],
                }
                for key, dev in self.devices.items()
            },
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, doc: Any, where: str = "profile") -> CalibrationProfile:
        if not isinstance(doc, Mapping) or doc.get("format") != PROFILE_FORMAT:
            raise CalibrationError(f"{where}: not a calibration profile (expected format {PROFILE_FORMAT!r})")
        devices: dict[str, DeviceCalibration] = {}
        raw_devices = doc.get("devices")
        if not isinstance(raw_devices, Mapping):
            raise CalibrationError(f"{where}: 'devices' must be a mapping of hardware key -> calibration")
        for key, d in raw_devices.items():
            w = f"{where}: devices.{key}"
            if not isinstance(d, Mapping):
                raise CalibrationError(f"{w}: must be a mapping")
            gemm: dict[GemmKind, GemmCurve] = {}
            for kname, cdoc in (d.get("gemm") or {}).items():
                try:
                    kind = GemmKind(kname)
                except ValueError:
                    raise CalibrationError(f"{w}: unknown GEMM kind {kname!r}") from None
                try:
                    gemm[kind] = GemmCurve.from_dict(cdoc, f"{w}.gemm.{kname}")
                except TandemError as e:
                    raise CalibrationError(str(e)) from None
            overrides: dict[str, float] = {}
            for name, v in (d.get("overrides") or {}).items():
                if name not in OVERRIDABLE:
                    raise CalibrationError(f"{w}: cannot override {name!r}; allowed: {', '.join(OVERRIDABLE)}")
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                    raise CalibrationError(f"{w}: override {name!r} must be a non-negative number, got {v!r}")
                overrides[name] = float(v)
            points = tuple(
                GemmPoint(key, GemmKind(p["kind"]), int(p["m"]), int(p["k"]), int(p["n"]), float(p["tflops"]),
                          str(p.get("source", "")))
                for p in d.get("points") or ()
            )
            devices[key] = DeviceCalibration(MappingProxyType(gemm), MappingProxyType(overrides), points)
        return cls(MappingProxyType(devices), str(doc.get("source", "")), str(doc.get("created", "")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationProfile:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{p}: cannot read calibration profile: {e}") from None
        return cls.from_json(doc, str(p))




# ------------------------------------------------------------------ from measurement JSON
_REF_KINDS = {"bf16": GemmKind.BF16, "fp8_rowwise": GemmKind.FP8_ROWWISE, "fp8_tensor": GemmKind.FP8_TENSOR}


def points_from_measurements(doc: Mapping[str, Any], device: str, source: str) -> list[GemmPoint]:
    """GEMM points from a measurement JSON. Two layouts are read:

    - the reference baseline (`../shared/reference/h100-baseline-*.json`): `square_TFLOPS` rows
      {size, bf16, fp8_rowwise, fp8_tensor, ...} and `thin` rows {M, K, N, bf16_TFLOPS,
      fp8_rowwise_TFLOPS, fp8_tensor_TFLOPS, ...};
    - a generic list `gemm: [{kind, m, k, n, tflops}]` (what benchmark scripts should write).
    Columns that are not plain GEMM kinds (e.g. `fp8_rowwise_with_unfused_quant`) are ignored.
    """
    out: list[GemmPoint] = []
    try:
        for r in doc.get("square_TFLOPS") or ():
            s = int(r["size"])
            for col, kind in _REF_KINDS.items():
                if r.get(col):
                    out.append(GemmPoint(device, kind, s, s, s, float(r[col]), f"{source} square_TFLOPS"))
        for r in doc.get("thin") or ():
            m, k, n = int(r["M"]), int(r["K"]), int(r["N"])
            for col, kind in _REF_KINDS.items():
                v = r.get(f"{col}_TFLOPS")
                if v:
                    out.append(GemmPoint(device, kind, m, k, n, float(v), f"{source} thin"))
        for r in doc.get("gemm") or ():
            out.append(GemmPoint(device, GemmKind(r["kind"]), int(r["m"]), int(r["k"]), int(r["n"]),
                                 float(r["tflops"]), str(r.get("source", source))))
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{source}: malformed GEMM measurement row: {e}") from None
    return out


def overrides_from_measurements(
    doc: Mapping[str, Any], power_doc: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Catalog figures a measurement JSON supports: copy bandwidth, and from a power JSON (rows of
    {phase, power_w}) idle, big-GEMM (prefill) and thin-GEMM M=64 fp8 (decode) board power."""
    out: dict[str, float] = {}
    bw = doc.get("copy_TBps", doc.get("mem_bw_tbps"))
    if isinstance(bw, int | float) and bw > 0:
        out["measured_mem_bw_tbps"] = float(bw)
    if power_doc:
        rows = [r for r in power_doc.get("rows") or () if isinstance(r, Mapping) and "power_w" in r]
        by_phase = {str(r.get("phase", "")): float(r["power_w"]) for r in rows}
        if "idle" in by_phase:
            out["idle_w"] = by_phase["idle"]
        big = [w for ph, w in by_phase.items() if ph.startswith("gemm ")]
        if big:
            out["prefill_power_w"] = max(big)
        thin = [w for ph, w in by_phase.items() if ph.startswith("thin gemm fp8") and "M=64" in ph]
        if thin:
            out["decode_power_w"] = max(thin)
    return out


def profile_from_measurements(
    device: str, points: Sequence[GemmPoint], peak_tflops: Mapping[GemmKind, float],
    overrides: Mapping[str, float], *, source: str, created: str = "",
) -> CalibrationProfile:
    """Fit one curve per GEMM kind measured and bundle them with `overrides` into a profile."""
    from orchestrator.core.gemm_fit import GENERIC_PRIOR, fit_gemm_curve, group_points

    curves: dict[GemmKind, GemmCurve] = {}
    groups = group_points(points)
    for kind in (GemmKind.FP8_ROWWISE, GemmKind.BF16, GemmKind.FP8_TENSOR):
        pts = groups.get((device, kind))
        if pts:
            prior = curves.get(GemmKind.FP8_ROWWISE, GENERIC_PRIOR)
            curves[kind] = fit_gemm_curve(pts, peak_tflops[kind], prior=prior, source=f"fit of {source}")
    dev = DeviceCalibration(MappingProxyType(curves), MappingProxyType(dict(overrides)), tuple(points))
    return CalibrationProfile(MappingProxyType({device: dev}), source=source, created=created)


# ------------------------------------------------------------------ non-GEMM time from whole steps
@dataclass(frozen=True)
class ForwardStep:
    """One measured forward step: a prefill of `tokens` tokens, or a decode step of `batch` sequences at
    `context` tokens each; `ms` excludes host scheduling/sampling (the cost model's step_overhead_s)."""

    phase: str  # "prefill" | "decode"
    ms: float
    tokens: int = 0
    batch: int = 0
    context: int = 0
    split: str = ""


def fit_non_gemm(
    cost_model: Any, device: str, steps: Sequence[ForwardStep], *, linear_mode: Any, kv_dtype: Any
) -> dict[str, float]:
    """Fit prefill_layer_overhead_s, decode_layer_overhead_s and elementwise_factor of `device` so that
    the cost model (less step_overhead_s) matches measured whole steps, by least squares on relative
    error with the three values kept >= 0. A phase without steps keeps an overhead of 0."""
    from orchestrator.core.cost_model import CostModel
    from orchestrator.core.hardware import Phase

    if not steps:
        raise CalibrationError("fit_non_gemm needs at least one measured step")
    spec = cost_model.spec(device)
    zero = CostModel(cost_model.model, cost_model.catalog.replace_spec(spec.with_overrides(
        prefill_layer_overhead_s=0.0, decode_layer_overhead_s=0.0, elementwise_factor=0.0)))
    unit = CostModel(cost_model.model, cost_model.catalog.replace_spec(spec.with_overrides(
        prefill_layer_overhead_s=0.0, decode_layer_overhead_s=0.0, elementwise_factor=1.0)))
    layers = cost_model.model.num_layers
    rows: list[tuple[list[float], float]] = []  # ([L·[prefill], L·[decode], traffic_s], gap_s), weights 1/meas
    for st in steps:
        if st.phase == "prefill":
            base = zero.prefill_time_s(device, st.tokens, linear_mode=linear_mode, kv_dtype=kv_dtype)
            traffic = unit.elementwise_time_s(device, st.tokens, Phase.PREFILL)
            x = [float(layers), 0.0, traffic]
        elif st.phase == "decode":
            base = zero.decode_step_time_s(device, [st.context] * st.batch, linear_mode=linear_mode,
                                           kv_dtype=kv_dtype)
            traffic = unit.elementwise_time_s(device, st.batch, Phase.DECODE)
            x = [0.0, float(layers), traffic]
        else:
            raise CalibrationError(f"unknown step phase {st.phase!r}")
        meas_s = st.ms * 1e-3
        gap = meas_s - (base - spec.step_overhead_s)
        rows.append(([v / meas_s for v in x], gap / meas_s))
    active = [j for j in range(3) if any(r[0][j] for r in rows)]
    while True:
        coef = _least_squares(rows, active)
        neg = [j for j in active if coef[j] < 0]
        if not neg:
            break
        active = [j for j in active if j not in neg]
    return {"prefill_layer_overhead_s": coef[0], "decode_layer_overhead_s": coef[1], "elementwise_factor": coef[2]}


def _least_squares(rows: Sequence[tuple[list[float], float]], active: Sequence[int]) -> list[float]:
    """Minimize Σ (x·c − y)² over the `active` coefficients (others 0), by Gaussian elimination."""
    n = len(active)
    a = [[sum(r[0][i] * r[0][j] for r in rows) for j in active] for i in active]
    b = [sum(r[0][i] * r[1] for r in rows) for i in active]
    for col in range(n):  # partial pivoting
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-300:
            raise CalibrationError("non-GEMM fit is singular: measure more varied steps")
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    out = [0.0, 0.0, 0.0]
    for i, j in enumerate(active):
        out[j] = b[i] / a[i][i]
    return out


# Which measured whole steps fit the non-GEMM terms; the rest are held out (scripts/calibrate_hw.py).
FORWARD_TRAIN = frozenset({("prefill", 512, 0), ("prefill", 4096, 0), ("decode", 1, 1024), ("decode", 64, 1024)})


def forward_steps(doc: Mapping[str, Any]) -> list[ForwardStep]:
    """Whole-step measurements from `calibrate_hw.py --measure-to X --forward` JSON, split by FORWARD_TRAIN."""
    out = []
    try:
        for r in doc["forward"]["rows"]:
            if r["phase"] == "prefill":
                key = ("prefill", int(r["tokens"]), 0)
                st = ForwardStep("prefill", float(r["ms"]), tokens=int(r["tokens"]))
            else:
                key = ("decode", int(r["batch"]), int(r["context"]))
                st = ForwardStep("decode", float(r["ms"]), batch=int(r["batch"]), context=int(r["context"]))
            out.append(ForwardStep(st.phase, st.ms, st.tokens, st.batch, st.context,
                                   "train" if key in FORWARD_TRAIN else "held-out"))
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"malformed forward measurement: {e}") from None
    return out

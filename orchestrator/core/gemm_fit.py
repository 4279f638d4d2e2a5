"""Fitting GEMM efficiency curves to measurements, and checking them out of sample.

A *measurement* is a `GemmPoint` (device, kind, M, K, N, measured TFLOPS, source, split).
`fit_gemm_curve` fits the six parameters of a `GemmCurve` to points of one device and kind by
minimizing a robust (soft-L1) loss on the log of the predicted time (a relative error, so a 2 µs thin
GEMM counts as much as a 1 ms square one), with a small pure-Python Nelder-Mead over transformed
parameters (no numpy: core stays stdlib-only). `fit_split` / `evaluate` do the out-of-sample check
of issue 5 point 3 (scripts/calibrate_paper.py prints it; tests/unit/cost/ asserts it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.hardware import GemmCurve, GemmKind, HardwareCatalog
from orchestrator.core.types import TandemError

# Log-error scale of the robust (soft-L1) fit loss: errors below ~10% count quadratically, larger ones
# linearly, so one noisy measurement (e.g. paper Table 4's Gaudi 2 (8,1024,1024), slower than M=16)
# cannot drag the whole curve.
ROBUST_SCALE = 0.1


class CalibrationError(TandemError, ValueError):
    """A malformed profile or measurement file, or a fit that cannot be done."""


@dataclass(frozen=True)
class GemmPoint:
    """One measured GEMM: (M×K)·(K×N) of `kind` on `device` ran at `tflops` (2MKN / time)."""

    device: str
    kind: GemmKind
    m: int
    k: int
    n: int
    tflops: float
    source: str = ""
    split: str = ""  # "train" / "held-out" when a dataset says so

    @property
    def time_s(self) -> float:
        return 2.0 * self.m * self.k * self.n / (self.tflops * 1e12)


# ------------------------------------------------------------------ fitting
# Parameter transforms: the optimizer works in an unbounded space.
def _to_params(v: Sequence[float]) -> tuple[float, float, float, float, float, float]:
    latency_s = math.exp(v[0]) * 1e-6
    eff_max = 1.0 / (1.0 + math.exp(-v[1]))
    half_size = math.exp(v[2])
    hill_n = 0.5 + 5.5 / (1.0 + math.exp(-v[3]))  # in (0.5, 6)
    stream_bw_tbps = math.exp(v[4])
    floor_s = math.exp(v[5]) * 1e-6
    return latency_s, eff_max, half_size, hill_n, stream_bw_tbps, floor_s


def _from_params(c: GemmCurve) -> list[float]:
    def logit(p: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    return [
        math.log(max(c.latency_s, 1e-7) * 1e6), logit(c.eff_max), math.log(c.half_size),
        logit((c.hill_n - 0.5) / 5.5), math.log(c.stream_bw_tbps), math.log(max(c.floor_s, 1e-7) * 1e6),
    ]


def nelder_mead(
    f: Callable[[Sequence[float]], float], x0: Sequence[float], *, step: float = 0.5,
    max_iter: int = 4000, tol: float = 1e-12,
) -> list[float]:
    """Minimize f from x0 (the textbook simplex method: reflect, expand, contract, shrink)."""
    n = len(x0)
    simplex = [list(x0)]
    for i in range(n):
        x = list(x0)
        x[i] += step
        simplex.append(x)
    values = [f(x) for x in simplex]
    for _ in range(max_iter):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) <= tol * (1.0 + abs(values[0])):
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        refl = [c + (c - w) for c, w in zip(centroid, worst, strict=True)]
        fr = f(refl)
        if fr < values[0]:
            exp = [c + 2.0 * (c - w) for c, w in zip(centroid, worst, strict=True)]
            fe = f(exp)
            simplex[-1], values[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, worst, strict=True)]
            fc = f(con)
            if fc < values[-1]:
                simplex[-1], values[-1] = con, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, xs, strict=True)] for xs in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = min(range(n + 1), key=values.__getitem__)
    return simplex[i]


def fit_gemm_curve(
    points: Sequence[GemmPoint], peak_tflops: float, *, prior: GemmCurve | None = None,
    prior_weight: float = 1e-4, source: str = "",
) -> GemmCurve:
    """Fit a GemmCurve to measured points of one device and kind.

    Minimizes mean (log t_pred − log t_meas)² plus a weak pull (`prior_weight`) toward `prior`, so that
    parameters the points do not constrain (e.g. the big-GEMM roof when only thin GEMMs were
    measured) stay at the prior instead of drifting. Restarts the simplex a few times from its best.
    """
    if not points:
        raise CalibrationError("fit_gemm_curve needs at least one measured point")
    kinds = {p.kind for p in points}
    if len(kinds) != 1:
        raise CalibrationError(f"fit one GEMM kind at a time, got {sorted(k.value for k in kinds)}")
    kind = next(iter(kinds))
    prior = prior or GemmCurve(
        latency_s=5e-6, eff_max=0.7, half_size=1000.0, hill_n=2.0, stream_bw_tbps=2.0, floor_s=1e-6
    )
    v0 = _from_params(prior)
    logs = [(p.m, p.k, p.n, math.log(p.time_s)) for p in points]

    def loss(v: Sequence[float]) -> float:
        try:
            c = GemmCurve(*_to_params(v))
        except TandemError:
            return 1e9
        err = 0.0
        for m, k, n, lt in logs:
            r = (math.log(c.time_s(m, k, n, peak_tflops, kind.operand_bytes)) - lt) / ROBUST_SCALE
            err += 2.0 * (math.sqrt(1.0 + r * r) - 1.0) * ROBUST_SCALE**2  # soft-L1: outliers pull less
        reg = sum((a - b) ** 2 for a, b in zip(v, v0, strict=True))
        return err / len(logs) + prior_weight * reg

    # Starts: the prior, and the prior with a floor at the fastest measured kernel (the simplex moves
    # in log space and would take long to grow a floor from nothing).
    t_min = min(p.time_s for p in points)
    starts = [v0, v0[:5] + [math.log(0.9 * t_min * 1e6)], [math.log(0.3 * t_min * 1e6)] + v0[1:5] + [math.log(t_min * 1e6)]]
    best, best_loss = v0, loss(v0)
    for start in starts:
        v = list(start)
        for step in (1.0, 0.3, 0.1):
            v = nelder_mead(loss, v, step=step)
        if loss(v) < best_loss:
            best, best_loss = v, loss(v)
    return GemmCurve(*_to_params(best), source=source)


def relative_error(pred: float, meas: float) -> float:
    """(pred − meas) / meas."""
    return (pred - meas) / meas


def predict_tflops(curve: GemmCurve, p: GemmPoint, peak_tflops: float) -> float:
    return 2.0 * p.m * p.k * p.n / curve.time_s(p.m, p.k, p.n, peak_tflops, p.kind.operand_bytes) / 1e12


def group_points(points: Iterable[GemmPoint]) -> dict[tuple[str, GemmKind], list[GemmPoint]]:
    out: dict[tuple[str, GemmKind], list[GemmPoint]] = {}
    for p in points:
        out.setdefault((p.device, p.kind), []).append(p)
    return out



PAPER_MEASUREMENTS = Path(__file__).resolve().parents[2] / "cluster_configs" / "hardware" / "measurements" / "paper-002-gemm.yaml"


def load_gemm_measurements(path: str | os.PathLike[str] = PAPER_MEASUREMENTS) -> list[GemmPoint]:
    """Read a `kind: gemm-measurements` YAML (see cluster_configs/hardware/measurements/)."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CalibrationError(f"{p}: cannot read GEMM measurements: {e}") from None
    if not isinstance(doc, Mapping) or doc.get("kind") != "gemm-measurements":
        raise CalibrationError(f"{p}: expected 'kind: gemm-measurements'")
    out = []
    for i, r in enumerate(doc.get("points") or ()):
        try:
            out.append(GemmPoint(
                device=str(r["device"]), kind=GemmKind(r["kind"]), m=int(r["m"]), k=int(r["k"]), n=int(r["n"]),
                tflops=float(r["tflops"]), source=str(r.get("source", "")), split=str(r.get("split", "")),
            ))
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"{p}: points[{i}] is malformed: {e}") from None
    return out


# A deliberately generic starting point, independent of any measurement (so a fit on a train split
# never sees held-out data through its prior).
GENERIC_PRIOR = GemmCurve(latency_s=5e-6, eff_max=0.7, half_size=1000.0, hill_n=2.0, stream_bw_tbps=2.0, floor_s=1e-6)
# Kinds fitted first serve as priors of the kinds that have fewer points (per-tensor: squares only).
_FIT_ORDER = (GemmKind.FP8_ROWWISE, GemmKind.BF16, GemmKind.FP8_TENSOR)


def fit_split(
    points: Iterable[GemmPoint], catalog: HardwareCatalog, *, splits: tuple[str, ...] = ("train",),
    source: str = "",
) -> dict[tuple[str, GemmKind], GemmCurve]:
    """Fit one curve per (device, kind) on the points whose split is in `splits`.

    FP8 per-tensor is fitted with the device's FP8 row-wise fit as its prior (the paper measured
    per-tensor on squares only, which leave latency, floor and streaming bandwidth unconstrained).
    """
    groups = group_points(p for p in points if p.split in splits)
    fits: dict[tuple[str, GemmKind], GemmCurve] = {}
    for kind in _FIT_ORDER:
        for (device, k), pts in sorted(groups.items(), key=lambda kv: kv[0][0]):
            if k is not kind:
                continue
            peak = catalog[device].peak_tflops(kind)
            prior = GENERIC_PRIOR
            if kind is GemmKind.FP8_TENSOR and (device, GemmKind.FP8_ROWWISE) in fits:
                prior = fits[(device, GemmKind.FP8_ROWWISE)]
            fits[(device, kind)] = fit_gemm_curve(pts, peak, prior=prior, source=source)
    return fits


@dataclass(frozen=True)
class FitRow:
    """One measured point next to what a fitted curve predicts for it."""

    point: GemmPoint
    predicted_tflops: float

    @property
    def error(self) -> float:
        return relative_error(self.predicted_tflops, self.point.tflops)


def evaluate(
    points: Iterable[GemmPoint], fits: Mapping[tuple[str, GemmKind], GemmCurve], catalog: HardwareCatalog
) -> list[FitRow]:
    """Predict every point that has a fitted curve for its device and kind."""
    rows = []
    for p in points:
        curve = fits.get((p.device, p.kind))
        if curve is not None:
            rows.append(FitRow(p, predict_tflops(curve, p, catalog[p.device].peak_tflops(p.kind))))
    return rows


def catalog_with_fits(catalog: HardwareCatalog, fits: Mapping[tuple[str, GemmKind], GemmCurve]) -> HardwareCatalog:
    """`catalog` with the GEMM curves of `fits` put in place of the catalog's (other kinds kept)."""
    from types import MappingProxyType

    out = catalog
    for device in sorted({d for d, _ in fits}):
        spec = out[device]
        curves = dict(spec.gemm)
        curves.update({k: c for (d, k), c in fits.items() if d == device})
        out = out.replace_spec(spec.with_overrides(gemm=MappingProxyType(curves)))
    return out

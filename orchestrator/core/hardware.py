"""The hardware catalog: what each accelerator can do, every figure with its source.

`HardwareCatalog.load_default()` reads `cluster_configs/hardware/*.yaml` (one accelerator per file,
plus `links.yaml` for the network links KV travels over). A figure in those files is written as
`{value: X, source: "..."}` and the loader refuses a figure without a source, so the catalog
cannot silently grow unsourced numbers. After load everything is frozen.

`GemmCurve` is the measured-efficiency model of one GEMM kernel family on one device (bf16,
fp8 row-wise, fp8 per-tensor): the time of an (M×K)·(K×N) GEMM is

    t = max( floor,  2MKN / (peak · eff(x)),  latency + bytes / stream_bw )
    eff(x) = eff_max · xⁿ / (xⁿ + halfⁿ),   x = (M·K·N)^(1/3)

a roofline whose compute roof saturates with GEMM size (tile and wave quantization, pipeline
fill), whose memory side carries a fixed latency to first byte (prologue, epilogue), and under
which no kernel runs faster than a floor (dispatch granularity). Its six parameters are fitted per
device and kind by `orchestrator.core.calibration`.

Pure Python: stdlib and pyyaml only.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from orchestrator.core.types import LinearMode, TandemError

DEFAULT_CATALOG_DIR = Path(__file__).resolve().parents[2] / "cluster_configs" / "hardware"
CATALOG_ENV = "TANDEM_HARDWARE_CATALOG"


class HardwareCatalogError(TandemError, ValueError):
    """A catalog file is malformed: a missing field, a figure without a source, a bad value."""


class UnknownHardware(TandemError, KeyError):
    """A hardware key that the catalog does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown hardware"


class Phase(enum.StrEnum):
    """What an accelerator is doing, for the power model."""

    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


class GemmKind(enum.StrEnum):
    """A GEMM kernel family whose efficiency is measured separately."""

    BF16 = "bf16"
    FP8_ROWWISE = "fp8_rowwise"  # per-token activation scales × per-channel weight scales (dynamic)
    FP8_TENSOR = "fp8_tensor"  # one scale per tensor (static)

    @property
    def operand_bytes(self) -> int:
        return 2 if self is GemmKind.BF16 else 1

    @classmethod
    def for_linear_mode(cls, mode: LinearMode) -> GemmKind:
        return {
            LinearMode.BF16: cls.BF16,
            LinearMode.FP8_DYNAMIC: cls.FP8_ROWWISE,
            LinearMode.FP8_STATIC: cls.FP8_TENSOR,
        }[mode]


def gemm_bytes(m: int, k: int, n: int, operand_bytes: int, out_bytes: int = 2) -> int:
    """Bytes a GEMM must move at least once: A (M×K), B (K×N) and the bf16 output (M×N)."""
    return m * k * operand_bytes + k * n * operand_bytes + m * n * out_bytes


@dataclass(frozen=True)
class GemmCurve:
    """Measured-efficiency roofline of one GEMM kind on one device (see the module docstring).

    latency_s: fixed time of one kernel; eff_max: the fraction of peak big GEMMs reach;
    half_size: the size x = (MKN)^(1/3) at which eff is half of eff_max; hill_n: steepness;
    stream_bw_tbps: the bandwidth at which this kernel streams its operands (TB/s);
    floor_s: the least time any kernel of this kind takes.
    """

    latency_s: float
    eff_max: float
    half_size: float
    hill_n: float
    stream_bw_tbps: float
    floor_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        bad = [
            name
            for name, v in (
                ("latency_s", self.latency_s),
                ("eff_max", self.eff_max),
                ("half_size", self.half_size),
                ("hill_n", self.hill_n),
                ("stream_bw_tbps", self.stream_bw_tbps),
                ("floor_s", self.floor_s),
            )
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)
        ]
        if bad or self.eff_max <= 0 or self.eff_max > 1.0 or self.stream_bw_tbps <= 0 or self.hill_n <= 0:
            raise HardwareCatalogError(
                f"GemmCurve needs finite non-negative values, 0 < eff_max <= 1, stream_bw_tbps > 0, "
                f"hill_n > 0; got {self!r}"
            )

    def efficiency(self, m: int, k: int, n: int) -> float:
        """Fraction of peak the compute roof sits at for this shape."""
        x = float(m * k * n) ** (1.0 / 3.0)
        if x <= 0:
            return self.eff_max
        xn = x**self.hill_n
        return self.eff_max * xn / (xn + self.half_size**self.hill_n)

    def time_s(self, m: int, k: int, n: int, peak_tflops: float, operand_bytes: int) -> float:
        """Seconds of one (M×K)·(K×N) GEMM at `peak_tflops` whose operands have `operand_bytes`."""
        if m <= 0 or k <= 0 or n <= 0:
            return 0.0
        flops = 2.0 * m * k * n
        compute_s = flops / (peak_tflops * 1e12 * self.efficiency(m, k, n))
        memory_s = self.latency_s + gemm_bytes(m, k, n, operand_bytes) / (self.stream_bw_tbps * 1e12)
        return max(self.floor_s, compute_s, memory_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "eff_max": self.eff_max,
            "half_size": self.half_size,
            "hill_n": self.hill_n,
            "stream_bw_tbps": self.stream_bw_tbps,
            "floor_s": self.floor_s,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> GemmCurve:
        try:
            return cls(
                latency_s=float(d["latency_s"]),
                eff_max=float(d["eff_max"]),
                half_size=float(d["half_size"]),
                hill_n=float(d["hill_n"]),
                stream_bw_tbps=float(d["stream_bw_tbps"]),
                floor_s=float(d.get("floor_s", 0.0)),
                source=str(d.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HardwareCatalogError(f"{where}: bad GEMM curve {dict(d)!r}: {e}") from None


@dataclass(frozen=True)
class LinkSpec:
    """A network path KV crosses: bandwidth in GB/s (10⁹ bytes/s) and one-way latency."""

    key: str
    name: str
    bandwidth_gb_per_s: float
    latency_s: float
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.bandwidth_gb_per_s > 0 and self.latency_s >= 0):
            raise HardwareCatalogError(f"link {self.key!r}: bandwidth must be > 0 and latency >= 0")


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator. Rates are dense (no sparsity). `sources` names where each figure comes from.

    peak_fp8_tflops is None where the device has no FP8 tensor cores (A100): FP8 linear modes then
    run at bf16 rates with bf16 operands, and `fp8_fallback` is True.
    """

    key: str
    name: str
    peak_bf16_tflops: float
    peak_fp8_tflops: float | None
    mem_gb: float
    mem_bw_tbps: float  # datasheet
    measured_mem_bw_tbps: float  # what a copy / decode attention actually streams
    tdp_w: float
    idle_w: float
    prefill_power_w: float  # board power running big GEMMs flat out
    decode_power_w: float  # board power running decode-shaped (thin, memory-bound) work flat out
    e4m3_max: float | None  # 448 (OCP e4m3fn), 240 (Gaudi 2, IEEE-style), None: no FP8
    gemm: Mapping[GemmKind, GemmCurve]
    attention_efficiency: float  # fraction of peak bf16 that prefill attention reaches
    step_overhead_s: float  # fixed time of one forward step outside GEMMs (launches, sampling, host)
    intra_node_gb_per_s: float
    network_link: str  # key into the catalog's links
    price_per_hour_usd: float
    sources: Mapping[str, str] = field(default_factory=dict)
    # Non-GEMM time beyond the modelled activation traffic (0 / 0 / 1 unless calibrated from whole
    # forward steps, see calibration.fit_non_gemm): a fixed time per layer per step (kernel launches
    # of norms, RoPE, activations; eager prefill pays host dispatch too) and a factor on the traffic.
    prefill_layer_overhead_s: float = 0.0
    decode_layer_overhead_s: float = 0.0
    elementwise_factor: float = 1.0

    @property
    def fp8_gemm_efficiency(self) -> Mapping[GemmKind, GemmCurve]:
        """The measured-efficiency curves of the FP8 GEMM kinds (empty on a device without FP8)."""
        return {k: c for k, c in self.gemm.items() if k is not GemmKind.BF16} if self.has_fp8 else {}

    @property
    def has_fp8(self) -> bool:
        return self.peak_fp8_tflops is not None

    def fp8_fallback(self, mode: LinearMode) -> bool:
        """True when `mode` asks for FP8 but this device runs it at bf16 rates."""
        return mode.is_fp8 and not self.has_fp8

    def peak_tflops(self, kind: GemmKind) -> float:
        if kind is GemmKind.BF16 or self.peak_fp8_tflops is None:
            return self.peak_bf16_tflops
        return self.peak_fp8_tflops

    def curve(self, kind: GemmKind) -> GemmCurve:
        """The efficiency curve of `kind`, falling back to the nearest measured kind."""
        if not self.has_fp8:
            kind = GemmKind.BF16
        order = {
            GemmKind.BF16: (GemmKind.BF16, GemmKind.FP8_ROWWISE, GemmKind.FP8_TENSOR),
            GemmKind.FP8_ROWWISE: (GemmKind.FP8_ROWWISE, GemmKind.FP8_TENSOR, GemmKind.BF16),
            GemmKind.FP8_TENSOR: (GemmKind.FP8_TENSOR, GemmKind.FP8_ROWWISE, GemmKind.BF16),
        }[kind]
        for k in order:
            if k in self.gemm:
                return self.gemm[k]
        raise HardwareCatalogError(f"{self.key}: no GEMM curve at all")

    def gemm_time_s(self, m: int, k: int, n: int, kind: GemmKind) -> float:
        """Seconds of one GEMM of `kind` (fp8 kinds fall back to bf16 on a device without FP8)."""
        if not self.has_fp8:
            kind = GemmKind.BF16
        return self.curve(kind).time_s(m, k, n, self.peak_tflops(kind), kind.operand_bytes)

    def with_overrides(self, **changes: Any) -> HardwareSpec:
        """A copy with some fields replaced (used by calibration profiles)."""
        return replace(self, **changes)


def _figure(doc: Mapping[str, Any], name: str, where: str, *, optional: bool = False) -> tuple[Any, str]:
    if name not in doc:
        if optional:
            return None, ""
        raise HardwareCatalogError(f"{where}: missing field {name!r}")
    raw = doc[name]
    if not isinstance(raw, Mapping) or "value" not in raw or not str(raw.get("source", "")).strip():
        raise HardwareCatalogError(
            f"{where}: field {name!r} must be written as {{value: ..., source: '...'}} "
            f"(every figure names its source); got {raw!r}"
        )
    return raw["value"], str(raw["source"])


def _number(value: Any, name: str, where: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise HardwareCatalogError(f"{where}: field {name!r} must be a non-negative number, got {value!r}")
    return float(value)


_NUMERIC = (
    "peak_bf16_tflops", "mem_gb", "mem_bw_tbps", "measured_mem_bw_tbps", "tdp_w", "idle_w",
    "prefill_power_w", "decode_power_w", "attention_efficiency", "step_overhead_s",
    "intra_node_gb_per_s", "price_per_hour_usd",
)


def parse_hardware(doc: Mapping[str, Any], where: str) -> HardwareSpec:
    """Build a HardwareSpec from one parsed YAML document (`kind: accelerator`)."""
    for name in ("key", "name", "network_link"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise HardwareCatalogError(f"{where}: missing string field {name!r}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in _NUMERIC:
        v, src = _figure(doc, name, where)
        values[name] = _number(v, name, where)
        sources[name] = src
    for name, default in (("prefill_layer_overhead_s", 0.0), ("decode_layer_overhead_s", 0.0),
                          ("elementwise_factor", 1.0)):
        if name in doc:
            v, src = _figure(doc, name, where)
            values[name] = _number(v, name, where)
            sources[name] = src
        else:
            values[name] = default
            sources[name] = "default: not calibrated"
    for name in ("peak_fp8_tflops", "e4m3_max"):
        v, src = _figure(doc, name, where)
        values[name] = _number(v, name, where, allow_none=True)
        sources[name] = src
    curves: dict[GemmKind, GemmCurve] = {}
    gemm_doc = doc.get("gemm")
    if not isinstance(gemm_doc, Mapping) or not gemm_doc:
        raise HardwareCatalogError(f"{where}: needs a 'gemm' mapping of kind -> curve")
    for kind_name, curve_doc in gemm_doc.items():
        try:
            kind = GemmKind(kind_name)
        except ValueError:
            raise HardwareCatalogError(
                f"{where}: unknown GEMM kind {kind_name!r}; known: {[k.value for k in GemmKind]}"
            ) from None
        if not isinstance(curve_doc, Mapping) or not str(curve_doc.get("source", "")).strip():
            raise HardwareCatalogError(f"{where}: gemm.{kind_name} needs a 'source'")
        curves[kind] = GemmCurve.from_dict(curve_doc, f"{where}: gemm.{kind_name}")
        sources[f"gemm.{kind_name}"] = curves[kind].source
    return HardwareSpec(
        key=doc["key"], name=doc["name"], network_link=doc["network_link"],
        gemm=MappingProxyType(curves), sources=MappingProxyType(sources), **values,
    )


def parse_links(doc: Mapping[str, Any], where: str) -> dict[str, LinkSpec]:
    links: dict[str, LinkSpec] = {}
    for key, ldoc in (doc.get("links") or {}).items():
        w = f"{where}: links.{key}"
        if not isinstance(ldoc, Mapping):
            raise HardwareCatalogError(f"{w}: must be a mapping")
        bw, bw_src = _figure(ldoc, "bandwidth_gb_per_s", w)
        lat, lat_src = _figure(ldoc, "latency_s", w)
        links[key] = LinkSpec(
            key=key, name=str(ldoc.get("name", key)),
            bandwidth_gb_per_s=_number(bw, "bandwidth_gb_per_s", w) or 0.0,
            latency_s=_number(lat, "latency_s", w) or 0.0,
            sources=MappingProxyType({"bandwidth_gb_per_s": bw_src, "latency_s": lat_src}),
        )
    return links


class HardwareCatalog(Mapping[str, HardwareSpec]):
    """Read-only mapping hw_key -> HardwareSpec, plus the named links and the default KV link."""

    def __init__(
        self, specs: Mapping[str, HardwareSpec], links: Mapping[str, LinkSpec], default_link: str
    ) -> None:
        self._specs = MappingProxyType(dict(specs))
        self.links: Mapping[str, LinkSpec] = MappingProxyType(dict(links))
        if default_link not in self.links:
            raise HardwareCatalogError(f"default_link {default_link!r} is not among links {sorted(self.links)}")
        self.default_link_key = default_link
        for spec in self._specs.values():
            if spec.network_link not in self.links:
                raise HardwareCatalogError(
                    f"{spec.key}: network_link {spec.network_link!r} is not among links {sorted(self.links)}"
                )

    def __getitem__(self, key: str) -> HardwareSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise UnknownHardware(f"unknown hardware {key!r}; the catalog holds: {', '.join(sorted(self._specs))}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def default_link(self) -> LinkSpec:
        return self.links[self.default_link_key]

    def link(self, key: str) -> LinkSpec:
        try:
            return self.links[key]
        except KeyError:
            raise UnknownHardware(f"unknown link {key!r}; known: {', '.join(sorted(self.links))}") from None

    def replace_spec(self, spec: HardwareSpec) -> HardwareCatalog:
        """A new catalog with `spec` put in place of the entry of the same key."""
        specs = dict(self._specs)
        specs[spec.key] = spec
        return HardwareCatalog(specs, self.links, self.default_link_key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardwareCatalog:
        """Load every top-level *.yaml of a directory (or one multi-document file)."""
        p = Path(path)
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise HardwareCatalogError(f"no hardware catalog YAML at {p}")
        specs: dict[str, HardwareSpec] = {}
        links: dict[str, LinkSpec] = {}
        default_link: str | None = None
        for f in files:
            try:
                docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
            except yaml.YAMLError as e:
                raise HardwareCatalogError(f"{f}: not valid YAML: {e}") from None
            for i, doc in enumerate(docs):
                where = f"{f.name}[{i}]" if len(docs) > 1 else f.name
                if not isinstance(doc, Mapping):
                    raise HardwareCatalogError(f"{where}: expected a mapping")
                kind = doc.get("kind")
                if kind == "accelerator":
                    spec = parse_hardware(doc, where)
                    if spec.key in specs:
                        raise HardwareCatalogError(f"{where}: duplicate hardware key {spec.key!r}")
                    specs[spec.key] = spec
                elif kind == "links":
                    links.update(parse_links(doc, where))
                    default_link = doc.get("default_link", default_link)
                else:
                    raise HardwareCatalogError(f"{where}: 'kind' must be 'accelerator' or 'links', got {kind!r}")
        if not specs:
            raise HardwareCatalogError(f"{p}: no accelerator entries")
        if default_link is None:
            raise HardwareCatalogError(f"{p}: no links document with a default_link")
        return cls(specs, links, default_link)

    @classmethod
    def load_default(cls) -> HardwareCatalog:
        """The shipped catalog (`cluster_configs/hardware/`), or $TANDEM_HARDWARE_CATALOG if set."""
        return cls.load(os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG_DIR)

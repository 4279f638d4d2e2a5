"""The hardware catalog: loads, every figure sourced, typed errors on bad files and keys."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator.core.hardware import (
    GemmKind,
    HardwareCatalog,
    HardwareCatalogError,
    UnknownHardware,
)
from orchestrator.core.types import LinearMode, TandemError

REQUIRED = {"h100-sxm", "h200", "gaudi2", "gaudi3", "l4", "a100"}


def test_default_catalog_has_the_issue_devices_each_figure_sourced(catalog):
    assert set(catalog.keys()) >= REQUIRED
    for key in REQUIRED:
        spec = catalog[key]
        for name in ("peak_bf16_tflops", "peak_fp8_tflops", "mem_gb", "mem_bw_tbps", "measured_mem_bw_tbps",
                     "tdp_w", "idle_w", "e4m3_max", "price_per_hour_usd"):
            assert spec.sources.get(name, "").strip(), f"{key}.{name} has no source"
        for kind in spec.gemm:
            assert spec.sources[f"gemm.{kind.value}"].strip()
        assert spec.measured_mem_bw_tbps <= spec.mem_bw_tbps
        assert 0 < spec.idle_w < spec.decode_power_w <= spec.tdp_w + 1e-9
        assert spec.prefill_power_w <= spec.tdp_w + 1e-9


def test_e4m3_ranges_and_fp8_presence(catalog):
    assert catalog["gaudi2"].e4m3_max == 240
    assert catalog["h100-sxm"].e4m3_max == 448
    assert catalog["gaudi3"].e4m3_max == 448
    a100 = catalog["a100"]
    assert a100.peak_fp8_tflops is None and a100.e4m3_max is None and a100.fp8_gemm_efficiency == {}
    assert set(catalog["gaudi2"].fp8_gemm_efficiency) == {GemmKind.FP8_ROWWISE, GemmKind.FP8_TENSOR}
    assert a100.fp8_fallback(LinearMode.FP8_DYNAMIC) and not a100.fp8_fallback(LinearMode.BF16)
    assert not catalog["l4"].fp8_fallback(LinearMode.FP8_DYNAMIC)
    # An fp8 GEMM on A100 costs exactly the bf16 GEMM (bf16 rates, 2-byte operands).
    assert a100.gemm_time_s(64, 4096, 4096, GemmKind.FP8_ROWWISE) == a100.gemm_time_s(64, 4096, 4096, GemmKind.BF16)


def test_unknown_key_is_typed_and_names_the_known_ones(catalog):
    with pytest.raises(UnknownHardware) as ei:
        catalog["h100"]
    assert isinstance(ei.value, TandemError)
    assert "h100-sxm" in str(ei.value) and "gaudi2" in str(ei.value)


def _write(tmp_path, body: str, links: bool = True):
    (tmp_path / "x.yaml").write_text(textwrap.dedent(body))
    if links:
        (tmp_path / "links.yaml").write_text(textwrap.dedent("""
            kind: links
            default_link: l
            links:
              l: {name: l, bandwidth_gb_per_s: {value: 1, source: s}, latency_s: {value: 0, source: s}}
        """))


GOOD = """
kind: accelerator
key: x
name: X
peak_bf16_tflops: {value: 100, source: datasheet}
peak_fp8_tflops: {value: 200, source: datasheet}
mem_gb: {value: 10, source: datasheet}
mem_bw_tbps: {value: 1, source: datasheet}
measured_mem_bw_tbps: {value: 0.9, source: measured}
tdp_w: {value: 300, source: datasheet}
idle_w: {value: 50, source: measured}
prefill_power_w: {value: 290, source: measured}
decode_power_w: {value: 250, source: measured}
e4m3_max: {value: 448, source: datasheet}
attention_efficiency: {value: 0.5, source: estimate}
step_overhead_s: {value: 0.001, source: estimate}
intra_node_gb_per_s: {value: 100, source: datasheet}
network_link: l
price_per_hour_usd: {value: 1, source: assumption}
gemm:
  bf16: {latency_s: 1.0e-6, eff_max: 0.8, half_size: 500, hill_n: 2, stream_bw_tbps: 0.9, source: estimate}
"""


def test_a_figure_without_source_is_refused(tmp_path):
    _write(tmp_path, GOOD.replace("mem_gb: {value: 10, source: datasheet}", "mem_gb: 10"))
    with pytest.raises(HardwareCatalogError, match="mem_gb.*source"):
        HardwareCatalog.load(tmp_path)


def test_a_good_file_loads_and_bad_values_are_refused(tmp_path):
    _write(tmp_path, GOOD)
    cat = HardwareCatalog.load(tmp_path)
    assert cat["x"].peak_tflops(GemmKind.FP8_ROWWISE) == 200
    _write(tmp_path, GOOD.replace("value: 0.9, source: measured", "value: -1, source: measured"))
    with pytest.raises(HardwareCatalogError, match="measured_mem_bw_tbps"):
        HardwareCatalog.load(tmp_path)
    _write(tmp_path, GOOD.replace("network_link: l", "network_link: nowhere"))
    with pytest.raises(HardwareCatalogError, match="nowhere"):
        HardwareCatalog.load(tmp_path)
    _write(tmp_path, GOOD.replace("eff_max: 0.8", "eff_max: 1.5"))
    with pytest.raises(HardwareCatalogError, match="eff_max"):
        HardwareCatalog.load(tmp_path)
    _write(tmp_path, GOOD.replace("  bf16:", "  int4:"))
    with pytest.raises(HardwareCatalogError, match="int4"):
        HardwareCatalog.load(tmp_path)


def test_missing_links_and_bad_yaml(tmp_path):
    _write(tmp_path, GOOD, links=False)
    with pytest.raises(HardwareCatalogError, match="default_link"):
        HardwareCatalog.load(tmp_path)
    (tmp_path / "x.yaml").write_text("kind: accelerator\nkey: [unclosed\n")
    with pytest.raises(HardwareCatalogError, match="not valid YAML"):
        HardwareCatalog.load(tmp_path)
    with pytest.raises(HardwareCatalogError):
        HardwareCatalog.load(tmp_path / "does-not-exist")


def test_env_var_points_load_default_elsewhere(tmp_path, monkeypatch):
    _write(tmp_path, GOOD)
    monkeypatch.setenv("TANDEM_HARDWARE_CATALOG", str(tmp_path))
    assert list(HardwareCatalog.load_default().keys()) == ["x"]

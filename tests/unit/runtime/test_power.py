"""Power telemetry: NVML through a stand-in pynvml module (the seam), the static-model fallback otherwise."""

from __future__ import annotations

import sys
import types

from orchestrator.runtime.power import NoMeter, NvmlPowerMeter, make_power_meter


def _fake_pynvml(milliwatts: list[int], fail_init: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(milliwatts)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetPowerUsage = lambda h: milliwatts[h]
    return m


def test_nvml_sums_visible_gpus_in_watts(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([350_000, 412_500, 100_000]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    meter = make_power_meter()
    assert isinstance(meter, NvmlPowerMeter) and meter.source == "nvml"
    assert meter.read_w("prefill-0") == 762.5


def test_no_nvml_falls_back_to_the_static_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([1], fail_init=True))
    meter = make_power_meter()
    assert isinstance(meter, NoMeter) and meter.read_w("decode-0") is None and meter.source == "model"


def test_no_gpu_visible_is_no_meter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert isinstance(make_power_meter(), NoMeter)

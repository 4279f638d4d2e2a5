"""Power telemetry through one interface (core's `PowerMeter` port: `read_w(worker_id) -> W | None`).

- `NvmlPowerMeter`: NVIDIA GPUs through NVML (`pynvml`, from the nvidia-ml-py package, imported
  lazily); sums the board power of the GPUs visible to the worker process.
- `NoMeter`: answers None, which tells the router and the metrics to use core's static power model
  (`core.power.PowerAccountant`: idle/prefill/decode watts of the hardware catalog).

`make_power_meter()` picks NVML when it loads and sees a GPU, else `NoMeter`. Pure Python here;
workers call it inside their actor process, where the accelerators are.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class NoMeter:
    """No live meter: `read_w` is None (the static model fills in)."""

    source = "model"

    def read_w(self, worker_id: str) -> float | None:
        return None


class NvmlPowerMeter:
    """Board power of the visible NVIDIA GPUs via NVML, in watts."""

    source = "nvml"

    def __init__(self, pynvml: Any, handles: list[Any]) -> None:
        self._nvml = pynvml
        self._handles = handles

    @classmethod
    def try_open(cls) -> NvmlPowerMeter | None:
        """An NVML meter, or None when pynvml is missing or sees no GPU."""
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # ImportError, NVMLError (no driver): no meter here
            log.debug("NVML unavailable: %s", e)
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() != "":
            idx = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        else:
            idx = list(range(count))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx if i < count]
        return cls(pynvml, handles) if handles else None

    def read_w(self, worker_id: str) -> float | None:
        try:
            return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0  # mW → W
        except Exception as e:
            log.warning("NVML read failed for %s: %s", worker_id, e)
            return None


def make_power_meter() -> NoMeter | NvmlPowerMeter:
    """NVML where it works, else the static model (NoMeter)."""
    return NvmlPowerMeter.try_open() or NoMeter()

"""Shared helpers of the kernels package: FP8 format limits, the typed input error, small checks.

No Triton import here, so the references (`reference.py`) import without Triton installed.
"""

from __future__ import annotations

import functools
import os

import torch

from orchestrator.core.types import TandemError

# Largest finite value of each FP8 storage dtype (scales map a row's amax onto it).
FP8_MAX: dict[torch.dtype, float] = {
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
    torch.float8_e4m3fnuz: 240.0,
}

# A row whose amax is below this gets this amax instead, so that all-zero rows quantize to zeros
# with a finite, positive scale (never 0 or NaN).
AMAX_FLOOR = 1e-12


class KernelInputError(TandemError, ValueError):
    """A kernel was called with tensors of the wrong shape, dtype, device or layout; the message says which."""


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype; KernelInputError for any other dtype."""
    try:
        return FP8_MAX[dtype]
    except KeyError:
        raise KernelInputError(
            f"expected an FP8 dtype ({', '.join(str(d) for d in FP8_MAX)}), got {dtype}"
        ) from None


def check(cond: bool, message: str) -> None:
    """Raise KernelInputError(message) when cond is false (input validation, not internal invariants)."""
    if not cond:
        raise KernelInputError(message)


def check_same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors if t is not None}
    check(len(devices) <= 1, f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device use programmatic dependent launch (PDL, sm_90+; TANDEM_PDL=0 turns it off).

    With PDL a kernel launched with `launch_pdl=True` may start while the kernel before it in the stream is
    still running; it must execute `gdc_wait` (wait for that kernel to finish and its writes to be visible)
    before touching any memory the earlier kernel may write or read. Producers call `gdc_launch_dependents`
    early so the next kernel's programs are resident and waiting when they finish — in a decode step that
    hides the launch and ramp-up of each thin GEMM (~0.6-0.7 us of 9-48 us on the H100; NOTES.md).
    """
    if device.type != "cuda" or os.environ.get("TANDEM_PDL", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]

"""Timing helpers shared by scripts/bench_kernels.py and scripts/bench_engine.py (GPU only).

Timing follows ../shared METHOD: warm up, CUDA events, median of many runs (triton.testing.do_bench, which
also flushes L2 before each run), and inputs rotated among enough copies that weights stream from HBM.
"""

from __future__ import annotations

import datetime
import itertools
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl


def env_info() -> dict[str, Any]:
    """Device, versions and date of this run (every JSON result carries it)."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), gpu_serial=_gpu_serial())
    return info


def _gpu_serial() -> str | None:
    """The board serial (nvidia-smi), to tell lent machines apart: compare timings only within one machine."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=serial", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def time_ms(fn: Callable[[], Any], warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median milliseconds of fn() on the GPU."""
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


class Rotation:
    """Enough argument sets that cycling through them exceeds L2 many times over; call it for the next set."""

    def __init__(self, make: Callable[[], Sequence[Any]], bytes_each: int, min_total_bytes: int = 256 << 20):
        self.n = max(2, -(-min_total_bytes // max(1, bytes_each)))
        self._sets = [make() for _ in range(self.n)]
        self._it = itertools.cycle(self._sets)

    def __call__(self) -> Sequence[Any]:
        return next(self._it)


rotating = Rotation


# A CUDA graph's replay has a fixed start cost that a graph of few short calls charges to each call: the same thin
# GEMM measured 0.6-0.7 us more per call with 16 calls per graph than with 64 (scripts/kernel_experiments/
# thin_scales_ab.py, session 5), i.e. ~11 us per replay. A decode step's graph holds hundreds of kernels, so
# microsecond kernels are timed with at least this many calls per graph (then < 0.2 us per call is left).
STEADY_CALLS = 64


def time_graph_ms(fn: Callable[[], Any], calls: int = 20, rep_ms: int = 40) -> float:
    """Median milliseconds per call of fn, from a CUDA graph that holds `calls` back-to-back calls.

    Removes the Python/launch overhead that eager timing of a microsecond kernel measures instead of the
    kernel (as a decode step under CUDA graphs runs). fn must be capturable (no host syncs). When fn draws
    its inputs from a Rotation, pass calls >= rotation.n so the graph cycles through every set.
    """
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, rep_ms=rep_ms) / calls


def copy_tbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus written, TB/s: the practical ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e9


def bf16_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / time_ms(lambda: a @ b) / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    if torch.isnan(o).any():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain fixed-width table (the device machine may lack rich)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_ceiling_tbps(nbytes: int, sm_count: int = 132) -> float:
    """Best rate at which ONE kernel launch can read nbytes (inside a CUDA graph, rotated buffers): the
    practical ceiling of a weight-streaming GEMM of that weight size, launch and ramp included."""
    n = nbytes // 4
    block = 2048
    progs_target = 4 * sm_count
    iters = max(1, -(-n // (block * progs_target)))
    grid = -(-n // (block * iters))
    rot = Rotation(lambda: (torch.randint(0, 100, (n,), device="cuda", dtype=torch.int32),), nbytes)
    out = torch.empty(grid, device="cuda", dtype=torch.int32)

    def run():
        _read_kernel[(grid,)](rot()[0], out, n, BLOCK=block, ITERS=iters, num_warps=8)

    return nbytes / time_graph_ms(run, calls=max(rot.n, STEADY_CALLS)) / 1e9

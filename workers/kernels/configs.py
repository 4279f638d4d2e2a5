"""Launch configurations and backend choice of the FP8 GEMMs, per shape, from measurements on the H100.

The tables here are the product of `scripts/bench_kernels.py --sweep` (see NOTES.md for the runs that
produced them). Change them only with a new measurement.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass, replace

import torch


class Backend(enum.Enum):
    THIN = "triton-thin"  # swap-AB thin GEMM (decode)
    TRITON = "triton-gemm"  # tiled GEMM (prefill)
    SCALED_MM = "torch-scaled-mm"  # cuBLASLt through torch._scaled_mm
    REFERENCE = "reference"  # torch math (CPU without the interpreter)


@dataclass(frozen=True)
class ThinConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False  # tiles fetched by TMA descriptors (gemm._thin_tma_kernel; split_k must be 1)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


GEMM_DEFAULT = GemmConfig()
THIN_MAX_M = 256  # above this, prefill kernels


def _t(bm: int, bn: int, bk: int, split: int, stages: int, tma: bool = False) -> ThinConfig:
    return ThinConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=stages, tma=tma)


# Measured winners on the H100 (benchmarks/kernels/h100-kernels-sweep-2026-11-22.json, `bench_kernels.py --sweep`),
# keyed by (N, K), then by M bucket (upper bound inclusive). Llama-3.1-8B: qkv, o, gate_up, down. The TMA
# configs of the 64 bucket: scripts/kernel_experiments/thin_tma.py (h100-thin-tma-2026-11-22.json; M=64:
# o 9.99 -> 9.58 us, down 25.31 -> 24.47, gate_up 48.16 -> 44.56; qkv and M <= 16 were no faster).
# Session 5 re-sweep up to M=64 with the scale loads before the K loop and 64-call graphs
# (scripts/kernel_experiments/thin_resweep.py, h100-thin-resweep-2026-11-22.json), changes of >= 1.5% adopted:
# qkv M<=32 6 stages (11.68 -> 11.04 us), qkv M<=64 TMA (11.18 -> 10.93), o M<=32 TMA (7.96 -> 7.81), down M<=32
# TMA with 8 stages (M=1 22.06 -> 21.73, M=16 22.48 -> 22.06, M=32 22.89 -> 22.40).
THIN_TABLE: dict[tuple[int, int], list[tuple[int, ThinConfig]]] = {
    (6144, 4096): [(16, _t(16, 64, 256, 1, 6)), (32, _t(32, 64, 256, 1, 6)), (64, _t(64, 64, 256, 1, 4, True)),
                   (128, _t(128, 64, 256, 1, 4)), (256, _t(128, 64, 128, 1, 4))],
    (4096, 4096): [(16, _t(16, 64, 256, 1, 6)), (32, _t(32, 64, 256, 1, 6, True)), (64, _t(64, 64, 256, 1, 6, True)),
                   (256, _t(128, 64, 256, 1, 4))],
    (28672, 4096): [(16, _t(16, 64, 256, 1, 4)), (32, _t(32, 64, 256, 1, 4)), (64, _t(64, 64, 256, 1, 3, True)),
                    (256, _t(128, 128, 128, 1, 3))],
    (4096, 14336): [(16, _t(16, 64, 256, 1, 8, True)), (32, _t(32, 64, 256, 1, 8, True)),
                    (64, _t(64, 64, 256, 1, 6, True)), (128, _t(128, 64, 256, 2, 4)), (256, _t(128, 64, 256, 1, 4))],
}
# Weights the engine's CUDA backend stores tile-packed for the decode GEMMs (packed_weight.py), with the tile
# (block_n, block_k) and the stages of the packed TMA thin kernel at M <= 64. Measured on the H100
# (scripts/kernel_experiments/thin_packed_current.py, h100-thin-packed-current-2026-11-22.json, 3 interleaved
# pairs, same config as the row-major kernel): down M=1..64 -2.3 to -3.9% (M=48 22.97 -> 22.07 us, M=64 23.22 ->
# 22.35); o and qkv 1.2-4.3% slower and gate_up within 1.4%, so those stay row-major.
PACKED_SHAPES: dict[tuple[int, int], tuple[int, int, int]] = {(4096, 14336): (64, 256, 6)}


def packed_tile(N: int, K: int) -> tuple[int, int] | None:
    """The (block_n, block_k) tile a weight of this shape is packed in for decode, or None to keep it row-major.
    TANDEM_PACK_WEIGHTS=0 keeps every weight row-major (for A/B measurements)."""
    if os.environ.get("TANDEM_PACK_WEIGHTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    entry = PACKED_SHAPES.get((N, K))
    return None if entry is None else entry[:2]


def packed_thin_config(M: int, N: int, K: int, block_n: int, block_k: int) -> ThinConfig:
    """The TMA thin config on a packed weight: its tile, a token block of 16 / 32 / 64 / 128, the measured stages
    (M > 64: unmeasured on packed weights, 4 stages), shrunk to fit the GPU's shared memory."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    stages = PACKED_SHAPES.get((N, K), (0, 0, 4))[2] if M <= 64 else 4
    cfg = ThinConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=1, num_warps=4, num_stages=stages,
                     tma=True)
    while not _fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


# Shapes where cuBLASLt (torch._scaled_mm) beat the thin kernel from this M on (same sweep).
SCALED_MM_FROM_M: dict[tuple[int, int], int] = {(6144, 4096): 129, (28672, 4096): 129}


# FP8 GEMM accumulation. On sm_90 the FP8 tensor-core instructions accumulate with a reduced-precision
# adder; cuBLASLt by default promotes the partial sums to float32 every few K steps, which costs time, while
# Triton's FP8 dots on sm_90 never promote (its `max_num_imprecise_acc` default). Measured on the H100
# (benchmarks/kernels/h100-fast-accum-2026-11-22.json, 8192 tokens): cuBLASLt row-wise FP8 with fast
# accumulation 1503 vs 1244 TFLOPS (14336x4096), 1411 vs 1254 (gate_up 28672x4096), 1381 vs 1180 (qkv),
# 1316 vs 1263 (down), 1193 vs 1187 (o); error against a float64 product of the same FP8 operands 0.21-0.33%
# vs 0.17% precise, where the FP8 quantization itself is 3.75% off the bf16 product. So Tandem's FP8 linears
# use fast accumulation (as vLLM's FP8 CUTLASS kernels do); TANDEM_FP8_FAST_ACCUM=0 turns it off.
FAST_ACCUM = True


def fast_accum() -> bool:
    """Whether cuBLASLt FP8 GEMMs skip the periodic float32 promotion (FAST_ACCUM; TANDEM_FP8_FAST_ACCUM)."""
    env = os.environ.get("TANDEM_FP8_FAST_ACCUM")
    return FAST_ACCUM if env is None else env.strip().lower() not in ("0", "false", "no", "off")


def _smem_bytes() -> int:
    """Shared memory one program may use on the current GPU (H100: 227 KB; L4 / sm_89: ~99 KB)."""
    if torch.cuda.is_available():
        return _smem_of(torch.cuda.current_device())
    return 227 * 1024


@functools.lru_cache(maxsize=16)
def _smem_of(index: int) -> int:
    p = torch.cuda.get_device_properties(index)
    return int(getattr(p, "shared_memory_per_block_optin", 0) or 227 * 1024)


def _fits(cfg: ThinConfig | GemmConfig) -> bool:
    if isinstance(cfg, ThinConfig):
        per_stage = cfg.block_n * cfg.block_k + cfg.block_k * cfg.block_m  # fp8 bytes
    else:
        per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k
    return per_stage * cfg.num_stages <= _smem_bytes()


# For GPUs with less shared memory than the H100 (e.g. L4): unmeasured, sized to fit ~99 KB.
SMALL_SMEM_GEMM = GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)


def thin_config(M: int, N: int, K: int) -> ThinConfig:
    """The measured config for (N, K) and M's bucket, else the sweep's usual winner; shrunk to fit the
    GPU's shared memory (configs were measured on the H100; smaller GPUs get fewer stages / shorter K).
    TANDEM_THIN_TMA=0 runs the TMA configs with pointer loads instead (for A/B measurements)."""
    for m_max, cfg in THIN_TABLE.get((N, K), []):
        if m_max >= M:
            if cfg.tma and os.environ.get("TANDEM_THIN_TMA", "1").strip().lower() in ("0", "false", "no", "off"):
                cfg = replace(cfg, tma=False)
            return cfg if _fits(cfg) else _shrink(cfg)
    # Unmeasured shape: no split-K (the reduction launch costs more than it gains on Llama shapes).
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    cfg = ThinConfig(block_m=block_m, block_n=64, block_k=256, split_k=1, num_warps=4, num_stages=4)
    return cfg if _fits(cfg) else _shrink(cfg)


def _shrink(cfg: ThinConfig) -> ThinConfig:
    """Fewer stages, then a shorter K step, until the config fits this GPU's shared memory."""
    while not _fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while not _fits(cfg) and cfg.block_k > 64:
        cfg = replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def gemm_config(M: int, N: int, K: int) -> GemmConfig:
    return GEMM_DEFAULT if _fits(GEMM_DEFAULT) else SMALL_SMEM_GEMM


# Prefill on a tile-packed weight runs the Triton GEMM (cuBLASLt wants row-major). Measured on the H100 for down
# (scripts/kernel_experiments/packed_prefill.py, h100-packed-prefill-2026-11-22.json; best of GEMM_SWEEP per M)
# against cuBLASLt on the row-major weight: M=300 47.5 vs 41.7 us, 512 49.6 vs 44.8 (both best with 128x128
# tiles, 4 warps, 4 stages), 2048 177.7 vs 164.4, 8192 731.9 vs 731.6 (default tiles).
PACKED_GEMM_SMALL_M = GemmConfig(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4)


def packed_gemm_config(M: int) -> GemmConfig:
    cfg = PACKED_GEMM_SMALL_M if M <= 1024 else GEMM_DEFAULT
    return cfg if _fits(cfg) else SMALL_SMEM_GEMM


def choose_backend(M: int, N: int, K: int, device: torch.device) -> Backend:
    """Which implementation runs an FP8 linear of this shape on this device (TANDEM_FP8_GEMM overrides)."""
    forced = os.environ.get("TANDEM_FP8_GEMM")
    if forced:
        return Backend(forced)
    if device.type != "cuda":
        return Backend.THIN if os.environ.get("TRITON_INTERPRET") == "1" and M <= THIN_MAX_M else Backend.REFERENCE
    aligned = M % 16 == 0 and N % 16 == 0 and K % 16 == 0
    if M <= THIN_MAX_M:
        smm_from = SCALED_MM_FROM_M.get((N, K), THIN_MAX_M + 1)
        return Backend.SCALED_MM if aligned and smm_from <= M else Backend.THIN
    # Prefill: cuBLASLt matched or beat the Triton tiles on every aligned Llama shape measured (within 1%
    # at 4096 tokens, 2-10% ahead at 8192); the Triton kernel serves shapes cuBLASLt rejects.
    return Backend.SCALED_MM if aligned else Backend.TRITON

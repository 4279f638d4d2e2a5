"""A tile-packed FP8 weight for the decode GEMMs: [N, K] stored as contiguous [block_n, block_k] tiles.

Row-major, the 64 programs of a thin GEMM each read a [64, 256] weight tile as 64 pieces of 256 B, 14 KB apart on
the down projection (K = 14336); packed, each tile is one contiguous 16 KB run and the whole weight of one
program one run. Measured on the H100 (scripts/kernel_experiments/thin_packed_current.py): down 2.3-3.9% faster
at M = 1..64 (M=64: 2.53 -> 2.63 TB/s), the o / qkv projections 1.6-4.3% slower, gate_up within 1.4% — so only
the shapes in `configs.PACKED_SHAPES` are packed, and only by the engine's CUDA backend on GPUs with TMA.

Layout: tile (i, j) — rows i·block_n.., columns j·block_k.. of the weight — is rows (i·k_tiles + j)·block_n ..
+ block_n of `data` [n_tiles · k_tiles · block_n, block_k], row-major. N and K are padded with zeros to whole
tiles (the GEMMs mask rows past N; zero columns past K add nothing). The thin GEMM reads it through a 2-D TMA
descriptor with box [block_n, block_k]; the prefill GEMM (gemm._gemm_kernel, PACK_N/PACK_K) through pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kernels._common import FP8_MAX, check


@dataclass(frozen=True)
class PackedWeight:
    data: torch.Tensor  # [n_tiles · k_tiles · block_n, block_k], FP8
    n: int
    k: int
    block_n: int
    block_k: int

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight's shape [N, K] (what a row-major w_q would have)."""
        return (self.n, self.k)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def k_tiles(self) -> int:
        return -(-self.k // self.block_k)

    def dim(self) -> int:
        return 2


def pack_weight(w_q: torch.Tensor, block_n: int = 64, block_k: int = 256) -> PackedWeight:
    """Row-major FP8 w_q [N, K] → PackedWeight (a copy; w_q is not modified)."""
    check(w_q.dim() == 2 and w_q.dtype in FP8_MAX, f"w_q must be a 2-D FP8 tensor, got {tuple(w_q.shape)} {w_q.dtype}")
    check(block_n > 0 and block_k > 0 and block_k % 16 == 0, f"bad tile [{block_n}, {block_k}]")
    n, k = w_q.shape
    nt, kt = -(-n // block_n), -(-k // block_k)
    raw = w_q.view(torch.uint8)  # pad and permute as bytes (FP8 has no zero-padding kernels on every device)
    if nt * block_n != n or kt * block_k != k:
        raw = torch.nn.functional.pad(raw, (0, kt * block_k - k, 0, nt * block_n - n))
    tiles = raw.reshape(nt, block_n, kt, block_k).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(tiles.view(-1, block_k).view(w_q.dtype), n, k, block_n, block_k)


def unpack_weight(w: PackedWeight) -> torch.Tensor:
    """PackedWeight → the row-major [N, K] FP8 weight it was packed from."""
    nt, kt = -(-w.n // w.block_n), w.k_tiles
    raw = w.data.view(torch.uint8).reshape(nt, kt, w.block_n, w.block_k).permute(0, 2, 1, 3)
    return raw.reshape(nt * w.block_n, kt * w.block_k)[: w.n, : w.k].contiguous().view(w.data.dtype)

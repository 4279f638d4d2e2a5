"""The paged KV cache: a block allocator (free list + reference counts) and the per-layer storage.

Storage per layer: K and V as [num_blocks, block_size, num_kv_heads, head_dim] in the KV dtype (bf16 or
an FP8 dtype) and, for FP8, float32 scales [num_blocks, block_size, num_kv_heads] beside them (one scale
per token per KV head). A sequence's block table lists its blocks in token order; token t lives in
block_table[t // block_size] at offset t % block_size ("slot" = block * block_size + offset).
The allocator imports no torch.
"""

from __future__ import annotations

from collections import deque

import torch

from orchestrator.core.types import KVDtype
from workers.engine import fp8 as fp8q
from workers.engine.errors import EngineCapacityError, KVLeakError


class BlockAllocator:
    """Hands out block ids from a FIFO free list; a block returns to it when its ref count drops to 0."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref count 1 each). Raises EngineCapacityError and allocates nothing if short."""
        if n > len(self._free):
            raise EngineCapacityError(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def incref(self, blocks: list[int]) -> None:
        """Share blocks (e.g. a common prefix); each holder frees them once."""
        for b in blocks:
            if self._refs[b] < 1:
                raise KVLeakError(f"incref of free block {b}")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] < 1:
                raise KVLeakError(f"double free of KV block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def held(self) -> list[int]:
        return [b for b, r in enumerate(self._refs) if r > 0]


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class PagedKVCache:
    """All layers' K/V storage plus the allocator."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        kv_dtype: KVDtype,
        device: torch.device,
    ) -> None:
        self.kv_dtype = KVDtype(kv_dtype)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.storage_dtype = fp8q.kv_storage_dtype(self.kv_dtype)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        if self.kv_dtype.is_fp8:
            self.k_scale: torch.Tensor | None = torch.ones(shape[:4], dtype=torch.float32, device=device)
            self.v_scale: torch.Tensor | None = torch.ones(shape[:4], dtype=torch.float32, device=device)
        else:
            self.k_scale = self.v_scale = None
        self.allocator = BlockAllocator(num_blocks)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        ks = None if self.k_scale is None else self.k_scale[i]
        vs = None if self.v_scale is None else self.v_scale[i]
        return self.k[i], self.v[i], ks, vs

    def slots(self, block_table: list[int], start: int, n: int) -> torch.Tensor:
        """Flat slot ids of tokens start..start+n-1 of a sequence with this block table."""
        t = torch.arange(start, start + n)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[t // self.block_size] * self.block_size + t % self.block_size

    def read_tokens(self, layer: int, block_table: list[int], start: int, n: int):  # type: ignore[no-untyped-def]
        """Raw stored (k, v, k_scale, v_scale) of tokens start..start+n-1 (token-major)."""
        slots = self.slots(block_table, start, n).to(self.k.device)
        kc, vc, ks, vs = self.layer(layer)
        hk, d = self.num_kv_heads, self.head_dim
        k = kc.reshape(-1, hk, d)[slots]
        v = vc.reshape(-1, hk, d)[slots]
        k_s = None if ks is None else ks.reshape(-1, hk)[slots]
        v_s = None if vs is None else vs.reshape(-1, hk)[slots]
        return k, v, k_s, v_s

    def nbytes(self) -> int:
        total = self.k.numel() * self.k.element_size() * 2
        if self.k_scale is not None:
            total += self.k_scale.numel() * 4 * 2
        return total

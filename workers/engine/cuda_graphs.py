"""CUDA-graph capture and replay of decode steps.

One graph per (padded batch size, padded block-table width): batch sizes are padded up to a bucket in
`BATCH_BUCKETS`, table widths up to a power of two (≤ 64 blocks) or a multiple of 32 blocks, capped at
the engine's widest table. Graphs are captured lazily, the first time a key is needed, into one shared
memory pool, and read their inputs from static buffers (token ids, positions, slots, block tables,
context lengths) that `run` fills before each replay. Padding rows write no KV (slot -1, which a
graph-safe backend skips) and attend to one token of block 0; their logits are dropped. Sampling stays
outside the graph: `run` returns a view of the graph's logits, valid until the next replay.

Used only when the engine runs on CUDA with an ops backend registered `graph_safe` (module docstring of
`ops.py`), greedy-invariant linear modes (bf16, fp8-dynamic with round-to-nearest) and `cuda_graphs=True`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
WIDTH_STEP_BLOCKS = 32


def batch_bucket(batch: int) -> int | None:
    """The smallest bucket ≥ batch, or None when the batch is larger than every bucket."""
    for b in BATCH_BUCKETS:
        if b >= batch:
            return b
    return None


def width_bucket(width: int, max_width: int) -> int:
    """Padded block-table width: next power of two up to 64, then the next multiple of 32; ≤ max_width."""
    if width <= 64:
        w = 1
        while w < width:
            w *= 2
    else:
        w = -(-width // WIDTH_STEP_BLOCKS) * WIDTH_STEP_BLOCKS
    return min(w, max_width)


class DecodeGraphs:
    """Captured decode steps of one model + cache. Not thread-safe (the engine has one caller)."""

    def __init__(self, model: Any, cache: Any, max_batch: int, max_width: int, device: torch.device) -> None:
        top = batch_bucket(min(max_batch, BATCH_BUCKETS[-1]))
        assert top is not None
        self.model, self.cache, self.device = model, cache, device
        self.max_batch, self.max_width = top, max_width
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False
        with torch.inference_mode():
            z = dict(dtype=torch.int64, device=device)
            self.tokens = torch.zeros(top, **z)  # type: ignore[arg-type]
            self.positions = torch.zeros(top, **z)  # type: ignore[arg-type]
            self.slots = torch.full((top,), -1, **z)  # type: ignore[arg-type]
            self.context_lens = torch.ones(top, **z)  # type: ignore[arg-type]
            self.tables = torch.zeros(top, max_width, **z)  # type: ignore[arg-type]

    def fits(self, batch: int, width: int) -> bool:
        return not self.failed and batch <= self.max_batch and width <= self.max_width

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def _inputs(self, b: int, w: int) -> tuple[torch.Tensor, ...]:
        return (self.tokens[:b], self.positions[:b], self.cache, self.slots[:b], self.tables[:b, :w],
                self.context_lens[:b])  # type: ignore[return-value]

    @torch.inference_mode()
    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # padding everywhere: the warm-up and capture runs write no KV
        self.tokens.zero_()
        self.positions.zero_()
        self.slots.fill_(-1)
        self.context_lens.fill_(1)
        self.tables.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: JIT compilation, autotuning, workspace allocation
            for _ in range(2):
                self.model.decode(*self._inputs(b, w))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.decode(*self._inputs(b, w))
        torch.cuda.synchronize(self.device)
        log.info("captured a decode CUDA graph for batch %d, table width %d", b, w)
        return graph, out

    @torch.inference_mode()
    def run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Inputs on the host ([B] int64 and tables [B, W] int64, W ≤ max_width) → logits [B, V] float32."""
        n, width = tables.shape
        b = batch_bucket(n)
        assert b is not None and b <= self.max_batch and width <= self.max_width
        w = width_bucket(width, self.max_width)
        key = (b, w)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, w)
        graph, out = self.graphs[key]
        pad = b - n
        self.tokens[:b].copy_(_padded(tokens, pad, 0), non_blocking=True)
        self.positions[:b].copy_(_padded(positions, pad, 0), non_blocking=True)
        self.slots[:b].copy_(_padded(slots, pad, -1), non_blocking=True)
        self.context_lens[:b].copy_(_padded(context_lens, pad, 1), non_blocking=True)
        host_table = torch.zeros((b, w), dtype=torch.int64)
        host_table[:n, :width] = tables
        self.tables[:b, :w].copy_(host_table, non_blocking=True)
        graph.replay()
        return out[:n]


def _padded(x: torch.Tensor, pad: int, value: int) -> torch.Tensor:
    return x if pad == 0 else torch.cat([x, x.new_full((pad,), value)])

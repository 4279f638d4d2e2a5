"""CUDA-graph capture and replay of decode steps.

One graph per (padded batch size, padded block-table width): batch sizes are padded up to a bucket in
`BATCH_BUCKETS`, table widths up to a power of two (≤ 64 blocks) or a multiple of 32 blocks, capped at
the engine's widest table. Graphs are captured lazily, the first time a key is needed, into one shared
memory pool, and read their inputs from static buffers (token ids, positions, slots, block tables,
context lengths) that `run` fills before each replay. Padding rows write no KV (slot -1, which a
graph-safe backend skips) and attend to one token of block 0; their logits are dropped. Sampling stays
outside the graph: `run` returns a view of the graph's logits, valid until the next replay.

The index inputs are int32 on the device. Measured on the H100 (8B shape, fp8 KV, B=64, 2K context):
with int64 context lengths the Triton decode attention took 4.23 ms per step (32 layers), with int32
3.32 ms; its per-token index arithmetic otherwise runs in 64 bits. A batch's block tables are uploaded
only when the batch changes (a running sequence's block list never changes: blocks are reserved at
admission), so a steady decode step copies 4·B int32 to the device.

Used only when the engine runs on CUDA with an ops backend registered `graph_safe` (module docstring of
`ops.py`), linear modes bf16 or fp8-dynamic with round-to-nearest, and `EngineConfig.cuda_graphs=True`.
A capture or replay that raises turns graphs off for the engine (`failed`); decoding goes on eagerly.
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
        self._table_key: object = None  # which batch's block table the static buffer holds
        with torch.inference_mode():
            # rows: token ids, positions, slots, context lengths; one host→device copy per step. int32, as
            # the block tables: the kernels' per-token index arithmetic then stays 32-bit
            self.meta = torch.zeros(4, top, dtype=torch.int32, device=device)
            self.tables = torch.zeros(top, max_width, dtype=torch.int32, device=device)
            self._rows = torch.zeros(top, dtype=torch.int32, device=device)  # lookahead: token source rows
            # pinned host staging, two of each, used in turn (run's docstring)
            self._stage = [torch.zeros(5, top, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._table_stage = [torch.zeros(top, max_width, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._turn = 0

    def fits(self, batch: int, width: int) -> bool:
        return not self.failed and batch <= self.max_batch and width <= self.max_width

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def _inputs(self, b: int, w: int) -> tuple[Any, ...]:
        m = self.meta
        return (m[0, :b], m[1, :b], self.cache, m[2, :b], self.tables[:b, :w], m[3, :b])

    @torch.inference_mode()
    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # padding everywhere: the warm-up and capture runs write no KV
        self.meta.zero_()
        self.meta[2].fill_(-1)
        self.meta[3].fill_(1)
        self.tables.zero_()
        self._table_key = None
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
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        block_lists: list[list[int]],
        batch_key: object,
        token_rows: list[int] | None = None,
        token_src: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Launch one decode step → logits [B, V] float32 (a view, valid until the next replay). Does not wait
        for the GPU: read the result after synchronizing (the engine's `.tolist()` or an event).

        tokens/positions/slots: one per sequence; block_lists: each sequence's block table. batch_key
        identifies the batch's block tables: when it equals the previous call's, the table on the device is
        reused as is (a running sequence's block list never changes), else it is uploaded again.
        token_rows/token_src (lookahead, engine.py): where token_rows[i] >= 0, sequence i's input token is
        token_src[token_rows[i]] — a token still on the device, picked by the step before — instead of
        tokens[i]. Host inputs go through pinned buffers (two, used in turn) and asynchronous copies, so the
        host does not wait for a step still running; a buffer is rewritten two launches later, after the
        engine has waited for the launch between."""
        n = len(tokens)
        width = max(len(bl) for bl in block_lists)
        b = batch_bucket(n)
        assert b is not None and b <= self.max_batch and width <= self.max_width
        w = width_bucket(width, self.max_width)
        key = (b, w)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, w)
        graph, out = self.graphs[key]
        pad = b - n
        ctx = [p + 1 for p in positions]
        self._turn ^= 1
        stage = self._stage[self._turn]
        stage[:, :b] = torch.tensor(
            [tokens + [0] * pad, positions + [0] * pad, slots + [-1] * pad, ctx + [1] * pad,
             (token_rows if token_rows is not None else [-1] * n) + [-1] * pad], dtype=torch.int32)
        self.meta[:, :b].copy_(stage[:4, :b], non_blocking=True)
        if token_rows is not None and token_src is not None:
            rows = self._rows[:b]
            rows.copy_(stage[4, :b], non_blocking=True)
            picked = token_src.index_select(0, rows.clamp(min=0).long()).to(torch.int32)
            self.meta[0, :b] = torch.where(rows >= 0, picked, self.meta[0, :b])
        table_key = (batch_key, b, w)
        if table_key != self._table_key:
            tstage = self._table_stage[self._turn]
            tstage[:b, :w] = torch.tensor([bl + [0] * (w - len(bl)) for bl in block_lists] + [[0] * w] * pad,
                                          dtype=torch.int32)
            self.tables[:b, :w].copy_(tstage[:b, :w], non_blocking=True)
            self._table_key = table_key
        graph.replay()
        return out[:n]

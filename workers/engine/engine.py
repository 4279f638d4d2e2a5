"""The engine: one model, one paged KV cache, a continuous-batching scheduler, KV export/import.

A step (`step()`): (1) requests whose KV was imported join the batch and emit their first token;
(2) waiting requests are admitted FIFO while batch slots and KV blocks allow, each prefilled alone,
and emit their first token; (3) every request that was already running decodes one token, as one
batch. A request reserves KV blocks for min(prompt + max_tokens, max_model_len) tokens when it is
admitted, so a running request never waits for memory and the scheduler never deadlocks; a request
that could never fit is refused by `add_request`. Finished, aborted and failed requests free their
blocks at once (a block that a launched decode step may still write comes back when the engine has waited
for that step). Decode lookahead (lookahead.py, on by default with CUDA graphs): step (3) launches the next
step's decode from the device's own picks before it waits for this one, so the host work of a step overlaps
the GPU work; the tokens are the same. Not thread-safe: one caller drives an engine.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from orchestrator.core.types import ComputeDtype, FinishReason, KVDtype, LinearMode, Rounding, SamplingParams
from workers.engine.config import EngineConfig, TokenOutput
from workers.engine.cuda_graphs import DecodeGraphs
from workers.engine.errors import (
    DuplicateRequest,
    EngineCapacityError,
    InvalidRequest,
    KVLeakError,
)
from workers.engine.kv_cache import PagedKVCache, blocks_for
from workers.engine.kv_import import KVImportMixin
from workers.engine.loader import load_model
from workers.engine.lookahead import Launch, finish_launch, next_rows
from workers.engine.model import LlamaModel
from workers.engine.ops import get_ops
from workers.engine.sampling import sample_token
from workers.engine.sequence import SeqState, Sequence, check_prompt
from workers.kv_payload import KVLayout

log = logging.getLogger(__name__)
_COMPUTE_DTYPES = {ComputeDtype.FLOAT32: torch.float32, ComputeDtype.BF16: torch.bfloat16}
DEFAULT_CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Prefill is compute-bound; decode is memory-bound.",
    "def add(a, b):\n    return a + b  # FP8 keeps three mantissa bits in E4M3 and two in E5M2.",
    "Tandem moves the KV cache between pools as FP8 blocks with one scale per token per head.",
)


class Engine(KVImportMixin):
    """The native model runner. See the module docstring for the step contract."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        cfg = config.normalized()
        self.config = cfg
        self.device = torch.device(cfg.device)
        init_dtype = _COMPUTE_DTYPES[cfg.dtype] if cfg.init_on_device else None
        loaded = load_model(cfg.model, cfg.seed, cfg.num_layers, cfg.device, init_dtype)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.ops = get_ops(self.device, cfg.ops_backend)
        self.model = LlamaModel(
            mc, loaded.weights, _COMPUTE_DTYPES[cfg.dtype], cfg.linear_mode, cfg.fp8_format, cfg.rounding, self.ops
        )
        fingerprint = loaded.fingerprint
        del loaded
        limit = mc.max_position_embeddings if cfg.max_model_len is None else min(cfg.max_model_len, mc.max_position_embeddings)
        self.max_model_len: int = min(limit, cfg.num_blocks * cfg.block_size)
        self._layout = KVLayout(
            model_fingerprint=fingerprint,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            rope_theta=mc.rope_theta,
            rope_scaling=mc.rope_scaling,
        )
        self.cache = PagedKVCache(
            mc.num_layers, cfg.num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim, cfg.kv_dtype, self.device
        )
        self._eos_ids = frozenset(mc.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self._seqs: dict[str, Sequence] = {}
        self._waiting: deque[str] = deque()
        self._ready: deque[str] = deque()
        self._running: list[str] = []
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._gen_counter = 0
        if cfg.linear_mode is LinearMode.FP8_STATIC:
            self._calibrate(cfg.calibration_prompts)
        self._graphs: DecodeGraphs | None = None
        if (cfg.cuda_graphs and self.device.type == "cuda" and self.ops.graph_safe
                and cfg.linear_mode in (LinearMode.BF16, LinearMode.FP8_DYNAMIC) and cfg.rounding is Rounding.NEAREST):
            self._graphs = DecodeGraphs(self.model, self.cache, cfg.max_batch_size,
                                        blocks_for(self.max_model_len, cfg.block_size), self.device)
        # one step of decode lookahead (lookahead.py): by default where decode steps are CUDA graphs
        self._lookahead = self._graphs is not None if cfg.lookahead is None else bool(cfg.lookahead)
        self._ahead: Launch | None = None  # the launched step the next decode will read

    @property
    def uses_cuda_graphs(self) -> bool:
        """True when decode steps are replayed as CUDA graphs (see cuda_graphs.py)."""
        return self._graphs is not None and not self._graphs.failed

    # ---- identity --------------------------------------------------------------------------------
    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_dtype(self) -> KVDtype:
        return self.config.kv_dtype

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_total_blocks(self) -> int:
        return self.cache.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.cache.allocator.num_free

    @property
    def num_running_requests(self) -> int:
        """Requests in the decode batch."""
        return len(self._running)

    @property
    def num_waiting_requests(self) -> int:
        """Requests queued for prefill or, with imported KV, for a batch slot."""
        return len(self._waiting) + len(self._ready)

    @property
    def num_kv_reservations(self) -> int:
        """KV imports in progress (reserve_kv called, add_request_from_kv not yet)."""
        return sum(1 for s in self._seqs.values() if s.state is SeqState.RESERVED)

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.model_config.eos_token_ids[0] if self.model_config.eos_token_ids else None

    # ---- validation ------------------------------------------------------------------------------
    def _check_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        return check_prompt(prompt_token_ids, self.model_config.vocab_size, self.max_model_len)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._seqs:
            raise DuplicateRequest(f"request id {request_id!r} is already in this engine")

    def _reserve_tokens(self, num_prompt: int, sampling: SamplingParams) -> int:
        return min(num_prompt + sampling.max_tokens, self.max_model_len)

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Queue a request for prefill. Raises InvalidSamplingParams, InvalidRequest/PromptTooLong,
        DuplicateRequest, or EngineCapacityError when it could never fit this engine's KV cache."""
        sampling.validate()
        ids = self._check_prompt(prompt_token_ids)
        self._check_new_id(request_id)
        need = blocks_for(self._reserve_tokens(len(ids), sampling), self.block_size)
        if need > self.num_total_blocks:
            raise EngineCapacityError(f"request needs {need} KV blocks; the engine has {self.num_total_blocks}")
        self._seqs[request_id] = Sequence(request_id, ids, sampling, SeqState.WAITING)
        self._waiting.append(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its blocks. Unknown ids are ignored."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        for queue in (self._waiting, self._ready):
            if request_id in queue:
                queue.remove(request_id)
        if request_id in self._running:
            self._running.remove(request_id)
        self._free(seq)
        if not self._running:
            self._retire()

    def has_unfinished(self) -> bool:
        """True while any request is waiting, ready or running (KV reservations do not count)."""
        return bool(self._waiting or self._ready or self._running)

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            ahead = self._ahead
            if ahead is not None and seq.serial in ahead.row_of:  # a launched step may still write them
                ahead.deferred.append(seq.blocks)
            else:
                self.cache.allocator.free(seq.blocks)
            seq.blocks = []

    def _retire(self) -> None:
        """Wait for the launched lookahead step, if any, drop its results and free the blocks it held."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.tokens()
            for blocks in ahead.deferred:
                self.cache.allocator.free(blocks)

    def _finish(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        if seq.request_id in self._running:
            self._running.remove(seq.request_id)
        self._free(seq)

    def _append(self, seq: Sequence, token: int) -> TokenOutput:
        """Record a generated token and apply the stop rules; finished requests free their blocks."""
        seq.outputs.append(token)
        p = seq.sampling
        reason: FinishReason | None = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self._eos_ids):
            reason = FinishReason.STOP
        elif len(seq.outputs) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq)
        return TokenOutput(seq.request_id, token, reason)

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        return sample_token(logits, seq.sampling, seq.num_tokens, self._rng)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        """One iteration (see the module docstring). Returns the tokens produced, in request order."""
        outputs: list[TokenOutput] = []
        decode_ids = list(self._running)
        max_batch = self.config.max_batch_size
        while self._ready and len(self._running) < max_batch:
            seq = self._seqs[self._ready.popleft()]
            seq.state = SeqState.RUNNING
            self._running.append(seq.request_id)
            first, seq.pending_first = seq.pending_first, None
            assert first is not None
            outputs.append(self._append(seq, first))
        admitted: list[Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < max_batch:
            seq = self._seqs[self._waiting[0]]
            need = blocks_for(self._reserve_tokens(len(seq.prompt), seq.sampling), self.block_size)
            if need > self.num_free_blocks:
                break  # first come, first served: later requests wait behind the head
            self._waiting.popleft()
            seq.blocks = self.cache.allocator.allocate(need)
            admitted.append(seq)
        for seq in admitted:
            outputs.extend(self._guarded([seq], self._prefill_one))
        if decode_ids:
            outputs.extend(self._guarded([self._seqs[i] for i in decode_ids], self._decode_batch))
        elif self._ahead is not None:
            self._retire()
        return outputs

    def _guarded(
        self, seqs: list[Sequence], fn: Callable[[list[Sequence]], list[TokenOutput]]
    ) -> list[TokenOutput]:
        """Run a forward pass; if it raises, fail its requests (ERROR, blocks freed) instead of crashing."""
        try:
            return fn(seqs)
        except Exception:
            log.exception("forward pass failed; failing requests %s", [s.request_id for s in seqs])
            try:
                self._retire()
            except Exception:
                log.exception("waiting for the lookahead step failed too")
                self._ahead = None
            for seq in seqs:
                self._finish(seq)
            return [TokenOutput(s.request_id, -1, FinishReason.ERROR) for s in seqs]

    def _prefill_one(self, seqs: list[Sequence]) -> list[TokenOutput]:
        (seq,) = seqs
        ids = torch.tensor(seq.prompt, dtype=torch.int64, device=self.device)
        slots = self.cache.slots(seq.blocks, 0, len(seq.prompt)).to(self.device)
        # RoPE writes each layer's K/V into the cache itself (ops.prefill_rope_kv: the same bytes that
        # prefill_export's quantize_kv hands out, so colocated and exported KV are identical)
        logits = self.model.prefill(ids, None, cache=self.cache, slots=slots)
        seq.num_cached = len(seq.prompt)
        seq.state = SeqState.RUNNING
        self._running.append(seq.request_id)
        return [self._append(seq, self._sample(logits, seq))]

    def _decode_batch(self, seqs: list[Sequence]) -> list[TokenOutput]:
        if not (self._lookahead and all(s.sampling.greedy for s in seqs)):
            self._retire()
            return self._decode_now(seqs)
        cur = self._ahead  # stays `_ahead` (its blocks deferred, waited for on failure) until the next launch
        if cur is None or not cur.covers(seqs):
            self._retire()  # a launch for another batch: wait for it, keep nothing from it
            cur = self._ahead = self._launch(seqs, [s.num_tokens - 1 for s in seqs], [s.last_token for s in seqs])
        # launch the next step before waiting for this one (lookahead.py)
        running = [self._seqs[i] for i in self._running]
        limit = self.max_model_len
        nxt, positions, tokens, rows = next_rows(
            cur, running, lambda s: len(s.outputs) + 1 >= s.sampling.max_tokens or s.num_tokens + 1 >= limit)
        ahead = None
        if nxt and all(s.sampling.greedy for s in nxt):
            ahead = self._launch(nxt, positions, tokens, rows, cur.picks)
        self._ahead = ahead
        picks = cur.tokens()
        for blocks in cur.deferred:
            self.cache.allocator.free(blocks)
        out = []
        for s in seqs:
            s.num_cached += 1
            out.append(self._append(s, picks[cur.row_of[s.serial]]))
        if not self._running:
            self._retire()
        return out

    def _launch(self, seqs: list[Sequence], positions: list[int], tokens: list[int], rows: list[int] | None = None,
                src: torch.Tensor | None = None) -> Launch:
        """Launch a greedy decode step of seqs at positions; input tokens from the host, or (rows[i] >= 0) from
        src[rows[i]] on the device. Does not wait for the GPU."""
        bs = self.block_size
        for s, pos in zip(seqs, positions, strict=True):
            assert pos < len(s.blocks) * bs, "KV reservation invariant"
        return finish_launch(seqs, positions, self._forward(seqs, positions, tokens, rows, src))

    def _forward(self, seqs: list[Sequence], positions: list[int], tokens: list[int], rows: list[int] | None,
                 src: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] of one decode step (graph replay when it fits, else eager); not waited for."""
        bs = self.block_size
        width = max(len(s.blocks) for s in seqs)
        if self._graphs is not None and self._graphs.fits(len(seqs), width):
            slot_list = [s.blocks[pos // bs] * bs + pos % bs for s, pos in zip(seqs, positions, strict=True)]
            try:
                return self._graphs.run(tokens, positions, slot_list, [s.blocks for s in seqs],
                                        tuple(s.serial for s in seqs), rows, src)
            except Exception:  # a capture that fails disables graphs; this step runs eagerly
                log.exception("CUDA graph capture/replay failed; decoding eagerly from now on")
                self._graphs.failed = True
        tables = torch.zeros((len(seqs), width), dtype=torch.int64)
        for i, s in enumerate(seqs):
            tables[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        slots = tables[torch.arange(len(seqs)), pos_t // bs] * bs + pos_t % bs
        dev = self.device
        tok = torch.tensor(tokens, dtype=torch.int64).to(dev)
        if rows is not None and src is not None:
            r = torch.tensor(rows, dtype=torch.int64).to(dev)
            tok = torch.where(r >= 0, src.index_select(0, r.clamp(min=0)), tok)
        return self.model.decode(tok, pos_t.to(dev), self.cache, slots.to(dev), tables.to(dev), (pos_t + 1).to(dev))

    def _decode_now(self, seqs: list[Sequence]) -> list[TokenOutput]:
        """A decode step without lookahead: launch, wait, sample on the host."""
        positions = [s.num_tokens - 1 for s in seqs]
        for s, pos in zip(seqs, positions, strict=True):
            assert s.num_cached == pos and pos < len(s.blocks) * self.block_size, "KV reservation invariant"
        logits = self._forward(seqs, positions, [s.last_token for s in seqs], None, None)
        if all(s.sampling.greedy for s in seqs):  # one device→host transfer for the whole batch
            picks = logits.argmax(dim=-1).tolist()
        else:
            picks = [self._sample(logits[i], s) for i, s in enumerate(seqs)]
        out = []
        for s, tok in zip(seqs, picks, strict=True):
            s.num_cached += 1
            out.append(self._append(s, int(tok)))
        return out

    # ---- conveniences ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Run the prompts to completion together; returns each one's generated token ids."""
        self._gen_counter += 1
        ids = [f"generate-{self._gen_counter}-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt in zip(ids, prompts, strict=True):
                self.add_request(rid, prompt, sampling)
            results: dict[str, list[int]] = {rid: [] for rid in ids}
            pending = set(ids)
            while pending:
                outs = self.step()
                if not outs and not self._running and not self._ready:
                    raise EngineCapacityError(
                        f"no progress: {self.num_free_blocks} free KV blocks are too few for the next waiting "
                        "request (blocks are held by KV reservations)"
                    )
                for o in outs:
                    if o.request_id in results:
                        if o.finish_reason is FinishReason.ERROR:
                            raise RuntimeError(f"request {o.request_id} failed in the engine (see the log)")
                        results[o.request_id].append(o.token_id)
                        if o.finish_reason is not None:
                            pending.discard(o.request_id)
            return [results[rid] for rid in ids]
        finally:
            for rid in ids:
                self.abort(rid)

    @torch.inference_mode()
    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, V] at every prompt position (teacher forcing); holds no KV."""
        ids = self._check_prompt(prompt_token_ids)
        return self.model.prefill(torch.tensor(ids, device=self.device), None, all_logits=True)

    def _calibrate(self, prompts: object) -> None:
        """fp8-static: record each linear's input amax over the prompts; scale = amax / fp8 max."""
        if prompts is None:
            prompts = [self.tokenizer.encode(t) for t in DEFAULT_CALIBRATION_TEXTS]
        lists = [[int(t) % self.model_config.vocab_size for t in p][: self.max_model_len - 1] for p in prompts]  # type: ignore[attr-defined]
        lists = [p for p in lists if p]
        if not lists:
            raise InvalidRequest("fp8-static calibration needs at least one non-empty prompt")
        for lin in self.model.linears():
            lin.calib_amax = 0.0
        for p in lists:
            self.model.prefill(torch.tensor(p, device=self.device), None)
        for lin in self.model.linears():
            lin.finish_calibration()

    def assert_no_leaks(self) -> None:
        """Raise KVLeakError if any KV block is held or any request is still tracked."""
        held = self.cache.allocator.held()
        if held or self._seqs:
            raise KVLeakError(
                f"{len(held)} KV block(s) held, requests still tracked: {sorted(self._seqs)[:10]} "
                f"(waiting {len(self._waiting)}, ready {len(self._ready)}, running {len(self._running)})"
            )

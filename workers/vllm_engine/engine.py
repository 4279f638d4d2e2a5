"""`VLLMEngine`: vLLM's engine, in this process, behind the interface Tandem's workers drive.

The prefill and decode workers (`workers/prefill.py`, `workers/decode.py`) call the same methods on
it as on the native engine: `add_request` / `step` / `abort` for local requests, `prefill_export`
(prefill pool), the `KVSink` methods plus `add_request_from_kv` (decode pool), and the identity and
telemetry properties. KV leaves and enters vLLM's paged cache only through `TandemConnector`
(`connector.py`), in Tandem's wire format; vLLM's own transfer channels are not used.

Decisions:
- The prefill pool runs each prompt as a vLLM request with max_tokens=1: the connector streams the
  prompt's KV layer by layer while vLLM computes it; vLLM's sampled token is the first token.
- The decode pool continues a request from (prompt KV, first token) like the native engine: it emits
  the first token at its next `step()`, then gives vLLM `prompt + [first]` with the prompt's KV as
  an external cache hit, so vLLM computes only from the first token on and samples the second.
- Reservations stage the incoming KV in host memory (vLLM allocates its blocks only when the
  request is added); capacity is checked against vLLM's free blocks minus what staged requests will
  need. Prefix caching is off (every prompt's KV must be computed to be exported).
- vLLM runs with VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core in this process, so the connector
  shares the adapter's hub) and VLLM_HOST_IP=127.0.0.1.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

import torch

from orchestrator.core.types import FinishReason, KVDtype, SamplingParams
from workers.engine.config import TokenOutput
from workers.engine.errors import DuplicateRequest, InvalidRequest, KVLeakError
from workers.engine.kv_cache import blocks_for
from workers.engine.loader import describe_checkpoint
from workers.engine.sequence import check_prompt
from workers.kv_payload import KVCapacityError, KVExport, KVImportError, KVLayerPayload, KVLayout
from workers.vllm_engine.config import VLLMConfigError, VLLMEngineConfig
from workers.vllm_engine.hub import ExportJob, ImportJob, drop_hub, new_hub

log = logging.getLogger(__name__)
_LIVE_ENGINES: set[int] = set()  # vLLM keeps one KV connector per process: one VLLMEngine per process
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


class VLLMEngine:
    """See the module docstring. Not thread-safe (the workers serialize calls, as for the native engine)."""

    def __init__(self, config: VLLMEngineConfig) -> None:
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        if _LIVE_ENGINES:
            raise VLLMConfigError("a VLLMEngine already runs in this process; vLLM keeps one KV connector per "
                                  "process, so each vLLM worker needs its own process (Ray actor)")
        self.config = config
        desc = describe_checkpoint(config.model)
        self.model_config = desc.config
        self.tokenizer = desc.tokenizer
        mc = self.model_config
        self._layout = KVLayout(model_fingerprint=desc.fingerprint, num_layers=mc.num_layers,
                                num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, rope_theta=mc.rope_theta,
                                rope_scaling=mc.rope_scaling)
        limit = mc.max_position_embeddings if config.max_model_len is None else \
            min(config.max_model_len, mc.max_position_embeddings)
        self.max_model_len = min(limit, (config.num_blocks - 1) * config.block_size)
        self.hub = new_hub()
        args = EngineArgs(
            model=config.model, tokenizer=config.model, dtype=config.vllm_dtype, seed=config.seed,
            block_size=config.block_size, kv_cache_dtype=config.vllm_cache_dtype,
            num_gpu_blocks_override=config.num_blocks, max_model_len=self.max_model_len,
            max_num_seqs=config.max_batch_size, enable_prefix_caching=False, enforce_eager=True,
            kv_cache_memory_bytes=_cache_bytes(config, mc.num_layers, mc.num_kv_heads, mc.head_dim),
            kv_transfer_config=KVTransferConfig(
                kv_connector="TandemConnector", kv_role="kv_both",
                kv_connector_module_path="workers.vllm_engine.connector",
                kv_connector_extra_config={"tandem_hub": self.hub.hub_id}),
        )
        try:
            self._llm = LLMEngine.from_engine_args(args)
        except BaseException:
            drop_hub(self.hub)
            raise
        _LIVE_ENGINES.add(id(self))
        core = self._llm.engine_core.engine_core  # InprocClient -> EngineCore
        self._scheduler = core.scheduler
        self._block_pool = self._scheduler.kv_cache_manager.block_pool
        self._total_blocks = self._block_pool.get_num_free_blocks()
        self._pending: deque[TokenOutput] = deque()  # outputs to emit at the next step()
        self._live: set[str] = set()  # requests vLLM is running for us
        self._imported: set[str] = set()  # decode requests added from KV

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_dtype(self) -> KVDtype:
        return KVDtype(self.config.kv_dtype)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_total_blocks(self) -> int:
        return self._total_blocks

    @property
    def num_free_blocks(self) -> int:
        return int(self._block_pool.get_num_free_blocks())

    @property
    def num_running_requests(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting_requests(self) -> int:
        return len(self._scheduler.waiting) + len(self._pending)

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return self.model_config.eos_token_ids[0] if self.model_config.eos_token_ids else None

    # ---- local requests ---------------------------------------------------------------------------
    def _check_prompt(self, ids: list[int]) -> list[int]:
        return check_prompt(ids, self.model_config.vocab_size, self.max_model_len)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._live or request_id in self.hub.imports or request_id in self.hub.exports:
            raise DuplicateRequest(f"request id {request_id!r} is already in this engine")

    def _vllm_params(self, s: SamplingParams, max_tokens: int, kv: dict[str, str] | None) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        return VSP(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0,
                   seed=s.seed, max_tokens=max_tokens, stop_token_ids=list(s.stop_token_ids),
                   ignore_eos=s.ignore_eos, detokenize=False, output_kind=RequestOutputKind.DELTA,
                   extra_args={"kv_transfer_params": kv} if kv else None)

    def _add(self, request_id: str, ids: list[int], params: Any) -> None:
        self._llm.add_request(request_id, {"prompt_token_ids": ids}, params)
        self._live.add(request_id)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Prefill and decode here. Raises InvalidRequest, PromptTooLong, InvalidSamplingParams, DuplicateRequest."""
        sampling.validate()
        self._check_new_id(request_id)
        ids = self._check_prompt(prompt_token_ids)
        self._add(request_id, ids, self._vllm_params(sampling, sampling.max_tokens, None))

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; idempotent."""
        if request_id in self._live:
            self._llm.abort_request([request_id])
            self._live.discard(request_id)
        self._imported.discard(request_id)
        self._pending = deque(o for o in self._pending if o.request_id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self._pending) or bool(self._live)

    def _collect(self) -> list[TokenOutput]:
        outs: list[TokenOutput] = []
        for ro in self._llm.step():
            rid = ro.request_id
            if rid not in self._live:
                continue
            comp = ro.outputs[0] if ro.outputs else None
            toks = list(comp.token_ids) if comp is not None else []
            reason = _FINISH.get(str(comp.finish_reason)) if (ro.finished and comp is not None) else None
            if ro.finished:
                self._live.discard(rid)
                self._imported.discard(rid)
                reason = reason or FinishReason.STOP
            for j, t in enumerate(toks):
                outs.append(TokenOutput(rid, int(t), reason if j == len(toks) - 1 else None))
            if ro.finished and not toks:
                outs.append(TokenOutput(rid, -1, FinishReason.ERROR if reason is None else reason))
        return outs

    def step(self) -> list[TokenOutput]:
        """One vLLM iteration; the first tokens of requests added from KV come out first."""
        outs = list(self._pending)
        self._pending.clear()
        if self._live:
            outs.extend(self._collect())
        return outs

    # ---- prefill pool -----------------------------------------------------------------------------
    def prefill_export(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       on_layer: Any = None) -> KVExport:
        """Run the prompt through vLLM; every layer's KV leaves through `on_layer` as it is computed.

        Returns a KVExport with the first token (its `layers` are filled only when on_layer is None).
        Re-raises what on_layer raised (after aborting the request in vLLM). Holds no blocks after."""
        sampling.validate()
        self._check_new_id(request_id)
        ids = self._check_prompt(prompt_token_ids)
        job = ExportJob(len(ids), on_layer)
        self.hub.exports[request_id] = job
        first: int | None = None
        others: list[TokenOutput] = []
        try:
            self._add(request_id, ids, self._vllm_params(sampling, 1, {"tandem_export": request_id}))
            while request_id in self._live and job.error is None:
                for o in self._collect():
                    if o.request_id == request_id:
                        first = o.token_id if o.token_id >= 0 else first
                    else:
                        others.append(o)
            if job.error is not None:
                raise job.error
            if first is None:
                raise InvalidRequest(f"vLLM finished prefill of {request_id!r} without a token")
            missing = [i for i in range(self.model_config.num_layers) if job.tokens_sent.get(i, 0) != len(ids)]
            if missing:
                raise KVImportError(f"vLLM's forward did not export the KV of layer(s) {missing[:8]} of {request_id!r}")
        except BaseException:
            self.abort(request_id)
            raise
        finally:
            self.hub.exports.pop(request_id, None)
            self._pending.extend(others)
        return KVExport(request_id, self.kv_layout, self.kv_dtype, ids, first, job.layers)

    # ---- decode pool: KVSink + add_request_from_kv --------------------------------------------------
    def _staged_blocks(self) -> int:
        return sum(blocks_for(j.num_tokens + 1 + j.max_new_tokens, self.block_size) for j in self.hub.imports.values())

    def reserve_kv(self, request_id: str, layout: KVLayout, num_tokens: int, max_new_tokens: int = 0) -> None:
        """Stage room for num_tokens of imported KV. Raises KVLayoutMismatch, KVCapacityError, DuplicateRequest."""
        self.kv_layout.check_compatible(layout)
        self._check_new_id(request_id)
        if num_tokens < 1 or num_tokens >= self.max_model_len:
            raise KVImportError(f"reserve_kv({request_id!r}): {num_tokens} tokens is outside [1, {self.max_model_len})")
        need = blocks_for(min(num_tokens + max_new_tokens, self.max_model_len), self.block_size)
        free = self.num_free_blocks - self._staged_blocks()
        if need > free:
            raise KVCapacityError(f"reserve_kv({request_id!r}) needs {need} blocks of {self.block_size}, {free} free "
                                  "in vLLM after staged imports")
        hub = self.hub
        if hub.storage_dtype is None:
            raise KVImportError("vLLM's connector has not registered its KV caches yet")
        mc = self.model_config
        shape = (mc.num_layers, num_tokens, mc.num_kv_heads, mc.head_dim)
        with hub.lock:
            hub.imports[request_id] = ImportJob(
                num_tokens, torch.empty(shape, dtype=hub.storage_dtype), torch.empty(shape, dtype=hub.storage_dtype),
                torch.zeros((mc.num_layers, num_tokens), dtype=torch.bool), max_new_tokens)

    def write_kv_layer(self, request_id: str, payload: KVLayerPayload) -> None:
        """Translate one layer's token range into vLLM's storage dtype and stage it."""
        hub = self.hub
        with hub.lock:
            job = hub.imports.get(request_id)
            if job is None:
                raise KVImportError(f"write_kv_layer({request_id!r}): no reservation")
            i, a, n = payload.layer, payload.token_start, payload.num_tokens
            mc = self.model_config
            if not 0 <= i < mc.num_layers or a < 0 or a + n > job.num_tokens:
                raise KVImportError(f"write_kv_layer({request_id!r}): layer {i} tokens [{a}, {a + n}) outside "
                                    f"{mc.num_layers} layers x {job.num_tokens} tokens")
            if tuple(payload.k.shape[1:]) != (mc.num_kv_heads, mc.head_dim):
                raise KVImportError(f"write_kv_layer({request_id!r}): K of shape {tuple(payload.k.shape)}, "
                                    f"want [T, {mc.num_kv_heads}, {mc.head_dim}]")
            if bool(job.written[i, a: a + n].any()):
                raise KVImportError(f"write_kv_layer({request_id!r}): layer {i} tokens [{a}, {a + n}) written twice")
            assert hub.layout is not None and hub.storage_dtype is not None
            ks, vs = hub.kv_scales.get(i, (1.0, 1.0))
            k, v = hub.layout.from_payload(payload, hub.storage_dtype, ks, vs)
            job.k[i, a: a + n], job.v[i, a: a + n] = k, v
            job.written[i, a: a + n] = True

    def release_kv(self, request_id: str) -> None:
        """Drop a reservation (and the vLLM request made from it, if any). Idempotent."""
        with self.hub.lock:
            self.hub.imports.pop(request_id, None)
        if request_id in self._imported:
            self.abort(request_id)

    def add_request_from_kv(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                            sampling: SamplingParams) -> None:
        """Continue a request whose prompt KV was staged: emit first_token_id at the next step, then let
        vLLM decode from it with the staged KV loaded into its blocks. Raises KVImportError (no or
        incomplete reservation, prompt length differs), InvalidRequest, InvalidSamplingParams."""
        sampling.validate()
        job = self.hub.imports.get(request_id)
        if job is None:
            raise KVImportError(f"add_request_from_kv({request_id!r}): no reservation")
        ids = self._check_prompt(prompt_token_ids)
        if len(ids) != job.num_tokens:
            raise KVImportError(f"add_request_from_kv({request_id!r}): prompt has {len(ids)} tokens, "
                                f"the KV reservation {job.num_tokens}")
        if not job.complete:
            layers = sorted({int(i) for i in torch.nonzero(~job.written.all(dim=1)).flatten()})
            raise KVImportError(f"add_request_from_kv({request_id!r}): KV of layer(s) {layers[:8]} incomplete")
        vocab = self.model_config.vocab_size
        if isinstance(first_token_id, bool) or not isinstance(first_token_id, int) or not 0 <= first_token_id < vocab:
            raise InvalidRequest(f"first_token_id {first_token_id!r} is outside the vocabulary [0, {vocab})")
        eos = set(self.model_config.eos_token_ids)
        reason = None
        if first_token_id in sampling.stop_token_ids or (not sampling.ignore_eos and first_token_id in eos):
            reason = FinishReason.STOP
        elif sampling.max_tokens <= 1 or len(ids) + 1 >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.release_kv(request_id)
            self._pending.append(TokenOutput(request_id, first_token_id, reason))
            return
        left = min(sampling.max_tokens - 1, self.max_model_len - len(ids) - 1)
        try:
            self._add(request_id, ids + [first_token_id],
                      self._vllm_params(sampling, left, {"tandem_import": request_id}))
        except BaseException:
            self.release_kv(request_id)
            raise
        self._imported.add(request_id)
        self._pending.append(TokenOutput(request_id, first_token_id, None))

    # ---- leaks, shutdown ----------------------------------------------------------------------------
    def assert_no_leaks(self) -> None:
        """Raise KVLeakError if vLLM holds blocks or runs requests, or the hub still stages KV."""
        free = self.num_free_blocks
        busy = len(self._scheduler.running) + len(self._scheduler.waiting)
        if free != self._total_blocks or busy or self._live or not self.hub.is_idle():
            raise KVLeakError(f"vLLM: {self._total_blocks - free} block(s) held, {busy} request(s) scheduled, "
                              f"live {sorted(self._live)[:5]}, staged imports {sorted(self.hub.imports)[:5]}, "
                              f"exports {sorted(self.hub.exports)[:5]}")

    def shutdown(self) -> None:
        """Stop vLLM's engine core and drop this process's KV connector, so another engine may start."""
        try:
            self._llm.engine_core.shutdown()
        except Exception:  # best effort at teardown
            log.debug("vLLM engine core shutdown failed", exc_info=True)
        try:
            from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

            ensure_kv_transfer_shutdown()
        except Exception:
            log.debug("vLLM KV connector shutdown failed", exc_info=True)
        drop_hub(self.hub)
        _LIVE_ENGINES.discard(id(self))


def _cache_bytes(cfg: VLLMEngineConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    elem = 1 if KVDtype(cfg.kv_dtype).is_fp8 else (4 if cfg.vllm_dtype == "float32" else 2)
    return cfg.num_blocks * cfg.block_size * num_layers * num_kv_heads * head_dim * 2 * elem


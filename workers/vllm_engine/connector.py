"""`TandemConnector`: vLLM's KV connector seam (`KVConnectorBase_V1`) joined to Tandem's wire.

vLLM loads it by module path (`kv_connector_module_path="workers.vllm_engine.connector"`) and builds
it twice in the adapter's process: with the SCHEDULER role and with the WORKER role. Requests say
what they want through `kv_transfer_params` (set by `VLLMEngine`, never by clients):

    {"tandem_export": RID}  prefill side: stream this prompt's KV out, layer by layer, as the
                            forward computes it (every prefill chunk, every attention layer)
    {"tandem_import": RID}  decode side: the prompt's KV is staged in the hub; load it into the
                            blocks vLLM allocates instead of recomputing it

RID is Tandem's request id (vLLM renames requests internally); hub jobs are keyed by it.

Scheduler side: `get_num_new_matched_tokens` reports the staged prompt as an external hit, loaded
synchronously (`load_async=False`), so vLLM schedules only the token after it; `build_connector_meta`
tells the worker side which blocks to fill (imports) or read (exports) this step.
Worker side: `register_kv_caches` learns the cache layout (`VLLMPagedLayout.probe` with vLLM's own
cache-write kernel) and each layer's KV scales; `start_load_kv` scatters staged imports before the
forward; `save_kv_layer` gathers each exported layer right after its attention ran and hands a
`KVLayerPayload` to the hub's job. All copies are synchronous: blocks are never read after the step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from workers.vllm_engine.hub import Hub, get_hub
from workers.vllm_engine.layout import VLLMPagedLayout, kv_dtype_of_vllm_cache

log = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"cannot find a layer index in vLLM layer name {layer_name!r}")
    return int(m.group(1))


@dataclass
class _Transfer:
    request_id: str  # Tandem's id (the hub's key)
    block_ids: list[int]
    token_start: int
    num_tokens: int


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


class TandemConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.hub: Hub = get_hub(self._kv_transfer_config.kv_connector_extra_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._cache_dtype = str(vllm_config.cache_config.cache_dtype)
        self._model_dtype = vllm_config.model_config.dtype
        # scheduler side
        # keyed by vLLM's internal request id; values carry Tandem's id for the hub
        self._pending_loads: dict[str, tuple[str, list[int], int]] = {}  # (tandem id, block ids, tokens)
        self._exports: dict[str, list[int]] = {}  # every block id the request holds
        self._export_ids: dict[str, tuple[str, int]] = {}  # (tandem id, prompt tokens)
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}

    # ============================== worker side ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.v1.attention.backends import cpu_attn

        self._kv_caches = dict(kv_caches)
        first = next(iter(self._kv_caches.values()))
        _, heads, bs, two_d = first.shape
        kv_dtype = kv_dtype_of_vllm_cache(self._cache_dtype)
        isa = cpu_attn._get_attn_isa(self._model_dtype, bs, two_d // 2, self._cache_dtype)

        def write(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> None:
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(k.to(self._model_dtype), v.to(self._model_dtype), kc, vc, slots, isa,
                                           1.0, 1.0, self._cache_dtype)

        layout = VLLMPagedLayout.probe(write, bs, heads, two_d // 2, kv_dtype, first.dtype)
        scales = {}
        ctx = self._vllm_config.compilation_config.static_forward_context
        for name in self._kv_caches:
            layer = ctx.get(name)
            scales[layer_index(name)] = (float(getattr(layer, "_k_scale_float", 1.0)),
                                         float(getattr(layer, "_v_scale_float", 1.0)))
        with self.hub.lock:
            self.hub.layout, self.hub.kv_scales, self.hub.storage_dtype = layout, scales, first.dtype

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        hub, layout = self.hub, self.hub.layout
        for t in meta.loads:
            with hub.lock:
                job = hub.imports.pop(t.request_id, None)
                if job is None or layout is None:
                    log.error("no staged KV for %s: vLLM will compute garbage for it", t.request_id)
                    continue
                slots = layout.slots(t.block_ids, 0, t.num_tokens)
                for name, cache in self._kv_caches.items():
                    i = layer_index(name)
                    layout.scatter(cache, slots, job.k[i, : t.num_tokens], job.v[i, : t.num_tokens])
                hub.loads_done += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous (start_load_kv finished them)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        if not meta.saves:
            return
        hub, layout = self.hub, self.hub.layout
        assert layout is not None
        i = layer_index(layer_name)
        k_scale, v_scale = hub.kv_scales.get(i, (1.0, 1.0))
        for t in meta.saves:
            job = hub.exports.get(t.request_id)
            if job is None or job.error is not None or t.num_tokens <= 0:
                continue
            try:
                k, v = layout.gather(kv_layer, layout.slots(t.block_ids, t.token_start, t.num_tokens))
                payload = layout.to_payload(i, t.token_start, k, v, k_scale, v_scale)
                if job.on_layer is None:
                    job.layers.append(payload)
                else:
                    job.on_layer(payload)
                job.tokens_sent[i] = job.tokens_sent.get(i, 0) + t.num_tokens
                hub.layers_exported += 1
            except BaseException as e:  # never raise into vLLM's forward: the adapter re-raises it
                job.error = e

    def wait_for_save(self) -> None:
        return  # saves are synchronous (save_kv_layer copied the rows out)

    # ============================== scheduler side ==============================
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if params.get("tandem_export") and rid not in self._exports:
            self._exports[rid] = []
            self._export_ids[rid] = (str(params["tandem_export"]), len(request.prompt_token_ids or []))
        tid = params.get("tandem_import")
        if tid:
            with self.hub.lock:
                job = self.hub.imports.get(str(tid))
                if job is not None and job.complete and job.num_tokens > num_computed_tokens:
                    return job.num_tokens - num_computed_tokens, False
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            tid = str((request.kv_transfer_params or {})["tandem_import"])
            self._pending_loads[request.request_id] = (tid, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = TandemConnectorMetadata()
        so = scheduler_output
        for req in so.scheduled_new_reqs:
            rid = req.req_id
            blocks = list(req.block_ids[0])
            load = self._pending_loads.pop(rid, None)
            if load is not None:
                meta.loads.append(_Transfer(load[0], blocks, 0, load[2]))
            if rid in self._exports:
                self._exports[rid] = blocks
                self._add_save(meta, rid, req.num_computed_tokens, so.num_scheduled_tokens.get(rid, 0))
        cached = so.scheduled_cached_reqs
        for j, rid in enumerate(cached.req_ids):
            if rid not in self._exports:
                continue
            new = cached.new_block_ids[j]
            if rid in cached.resumed_req_ids and new is not None:
                self._exports[rid] = list(new[0])
            elif new is not None:
                self._exports[rid].extend(new[0])
            self._add_save(meta, rid, cached.num_computed_tokens[j], so.num_scheduled_tokens.get(rid, 0))
        return meta

    def _add_save(self, meta: TandemConnectorMetadata, rid: str, start: int, scheduled: int) -> None:
        tid, prompt = self._export_ids[rid]
        end = min(start + scheduled, prompt)
        if end > start:
            meta.saves.append(_Transfer(tid, list(self._exports[rid]), start, end - start))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._pending_loads.pop(rid, None)
        self._exports.pop(rid, None)
        self._export_ids.pop(rid, None)
        return False, None

"""Disaggregation primitives of the engine: prefill + KV export, and the KVSink side (import).

Export (`prefill_export`): prefill runs without touching the paged cache; each layer's K/V is quantized
to the engine's KV dtype exactly as the cache would store it and handed to `on_layer` at once, so a
transport can send layer i while layer i+1 computes. The first token is sampled at the end.

Import (`KVSink`): `reserve_kv` → `write_kv_layer` (any layer order, each token once, re-blocked into
this engine's block size) → `add_request_from_kv` (the request joins the batch; its first token comes
out of the next `step()`), or `release_kv` on failure. The decoding engine then sees exactly the KV a
colocated prefill would have written, so disaggregation does not change any token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from orchestrator.core.types import SamplingParams
from workers.engine.errors import EngineCapacityError, InvalidRequest, PromptTooLong
from workers.engine.kv_cache import blocks_for
from workers.engine.ops import write_kv_raw
from workers.engine.sequence import SeqState, Sequence
from workers.kv_payload import KVCapacityError, KVExport, KVImportError, KVLayerPayload, KVLayout

if TYPE_CHECKING:  # the mixin uses Engine's attributes; typed loosely to avoid an import cycle
    from typing import Any as _EngineBase
else:
    _EngineBase = object


class KVImportMixin(_EngineBase):
    """Mixed into `Engine`; uses its cache, model, sequences and queues."""

    @torch.inference_mode()
    def prefill_export(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        on_layer: Callable[[KVLayerPayload], None] | None = None,
    ) -> KVExport:
        """Prefill only; return the request's KV (and stream each layer to `on_layer` as it is ready).

        Holds no blocks afterwards. Raises InvalidSamplingParams, InvalidRequest/PromptTooLong.
        """
        sampling.validate()
        ids = self._check_prompt(prompt_token_ids)
        layers: list[KVLayerPayload] = []

        def export_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            kq, ks = self.ops.quantize_kv(k, self.kv_dtype)
            vq, vs = self.ops.quantize_kv(v, self.kv_dtype)
            payload = KVLayerPayload(layer, 0, kq.contiguous(), vq.contiguous(), ks, vs)
            layers.append(payload)
            if on_layer is not None:
                on_layer(payload)

        logits = self.model.prefill(torch.tensor(ids, device=self.device), export_layer)
        seq = Sequence(request_id, ids, sampling, SeqState.RUNNING)
        first = self._sample(logits, seq)
        return KVExport(request_id, self.kv_layout, self.kv_dtype, ids, first, layers)

    # ---- KVSink ----------------------------------------------------------------------------------
    def reserve_kv(self, request_id: str, layout: KVLayout, num_tokens: int, max_new_tokens: int = 0) -> None:
        """Allocate blocks for num_tokens (+ max_new_tokens, to also cover decoding: recommended).

        Raises KVLayoutMismatch (names the differing factor), DuplicateRequest, PromptTooLong,
        KVImportError (num_tokens < 1) or KVCapacityError (too few free blocks now).
        """
        self.kv_layout.check_compatible(layout)
        self._check_new_id(request_id)
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise KVImportError(f"reserve_kv({request_id!r}): num_tokens must be >= 1, got {num_tokens!r}")
        if num_tokens >= self.max_model_len:
            raise PromptTooLong(f"KV of {num_tokens} tokens does not fit the context of {self.max_model_len}")
        total = min(num_tokens + max(0, int(max_new_tokens)), self.max_model_len)
        need = blocks_for(total, self.block_size)
        if need > self.num_free_blocks:
            raise KVCapacityError(
                f"reserve_kv({request_id!r}) needs {need} blocks of {self.block_size} tokens; "
                f"{self.num_free_blocks} of {self.num_total_blocks} free"
            )
        seq = Sequence(request_id, [], SamplingParams(), SeqState.RESERVED, reserved_tokens=num_tokens)
        seq.blocks = self.cache.allocator.allocate(need)
        seq.written = [bytearray(num_tokens) for _ in range(self.model_config.num_layers)]
        self._seqs[request_id] = seq

    def _reserved(self, request_id: str, what: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None or seq.state is not SeqState.RESERVED:
            state = "unknown" if seq is None else seq.state.value
            raise KVImportError(f"{what}({request_id!r}): no KV reservation for this request (state: {state})")
        return seq

    def write_kv_layer(self, request_id: str, payload: KVLayerPayload) -> None:
        """Write one layer's token range into the reserved blocks. Raises KVImportError on any bad field."""
        seq = self._reserved(request_id, "write_kv_layer")
        mc = self.model_config
        where = f"write_kv_layer({request_id!r}, layer {payload.layer})"
        if not 0 <= payload.layer < mc.num_layers:
            raise KVImportError(f"{where}: layer out of range [0, {mc.num_layers})")
        n, start = payload.num_tokens, payload.token_start
        if n < 1 or start < 0 or start + n > seq.reserved_tokens:
            raise KVImportError(f"{where}: tokens [{start}, {start + n}) outside the reservation of {seq.reserved_tokens}")
        shape = (n, mc.num_kv_heads, mc.head_dim)
        want = self.cache.storage_dtype
        for name in ("k", "v"):
            t = getattr(payload, name)
            if tuple(t.shape) != shape:
                raise KVImportError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
            if t.dtype != want:
                raise KVImportError(f"{where}: {name} is {t.dtype}, this engine stores {want} ({self.kv_dtype.value}); "
                                    "the transport must transcode")
        scales = (payload.k_scale, payload.v_scale)
        if self.kv_dtype.is_fp8:
            for name, s in zip(("k_scale", "v_scale"), scales, strict=True):
                if s is None or tuple(s.shape) != shape[:2]:
                    got = None if s is None else tuple(s.shape)
                    raise KVImportError(f"{where}: {name} must be float32 {shape[:2]}, got {got}")
        elif any(s is not None for s in scales):
            raise KVImportError(f"{where}: bf16 KV carries no scales")
        done = seq.written[payload.layer]
        if any(done[start : start + n]):
            raise KVImportError(f"{where}: tokens [{start}, {start + n}) were already written")
        dev = self.device
        slots = self.cache.slots(seq.blocks, start, n).to(dev)
        kc, vc, ks, vs = self.cache.layer(payload.layer)
        k_s = None if payload.k_scale is None else payload.k_scale.to(dev, torch.float32)
        v_s = None if payload.v_scale is None else payload.v_scale.to(dev, torch.float32)
        write_kv_raw(kc, vc, ks, vs, slots, payload.k.to(dev), payload.v.to(dev), k_s, v_s)
        done[start : start + n] = b"\x01" * n

    def release_kv(self, request_id: str) -> None:
        """Free a reservation (before `add_request_from_kv`). Idempotent; unknown ids are ignored.

        After `add_request_from_kv` the request is a normal one: use `abort`.
        """
        seq = self._seqs.get(request_id)
        if seq is not None and seq.state is SeqState.RESERVED:
            self._seqs.pop(request_id)
            self._free(seq)

    def add_request_from_kv(
        self, request_id: str, prompt_token_ids: list[int], first_token_id: int, sampling: SamplingParams
    ) -> None:
        """Turn a fully written reservation into a running request that starts with `first_token_id`.

        Raises KVImportError (no reservation, incomplete layers, prompt length differs), InvalidRequest,
        InvalidSamplingParams, or EngineCapacityError when the blocks for decoding cannot be added now
        (the reservation is kept: retry later or `release_kv`).
        """
        seq = self._reserved(request_id, "add_request_from_kv")
        sampling.validate()
        ids = self._check_prompt(prompt_token_ids)
        if len(ids) != seq.reserved_tokens:
            raise KVImportError(f"add_request_from_kv({request_id!r}): prompt has {len(ids)} tokens, "
                                f"the KV reservation {seq.reserved_tokens}")
        missing = [i for i, done in enumerate(seq.written) if not all(done)]
        if missing:
            raise KVImportError(f"add_request_from_kv({request_id!r}): KV of layer(s) {missing[:8]} incomplete")
        vocab = self.model_config.vocab_size
        if isinstance(first_token_id, bool) or not isinstance(first_token_id, int) or not 0 <= first_token_id < vocab:
            raise InvalidRequest(f"first_token_id {first_token_id!r} is outside the vocabulary [0, {vocab})")
        need = blocks_for(self._reserve_tokens(len(ids), sampling), self.block_size)
        extra = need - len(seq.blocks)
        if extra > 0:
            if extra > self.num_free_blocks:
                raise EngineCapacityError(
                    f"add_request_from_kv({request_id!r}) needs {extra} more blocks to decode, "
                    f"{self.num_free_blocks} free; reserve with max_new_tokens to avoid this"
                )
            seq.blocks += self.cache.allocator.allocate(extra)
        seq.prompt, seq.sampling, seq.num_cached = ids, sampling, len(ids)
        seq.pending_first, seq.written = first_token_id, []
        seq.state = SeqState.READY
        self._ready.append(request_id)

    def import_kv(self, export: KVExport, sampling: SamplingParams) -> None:
        """Convenience: reserve + write every layer + add_request_from_kv; releases on any failure."""
        sampling.validate()
        if export.kv_dtype != self.kv_dtype:
            raise KVImportError(f"export is {export.kv_dtype.value} KV, this engine stores {self.kv_dtype.value}; "
                                "transcode first")
        if export.first_token_id is None:
            raise KVImportError(f"export of {export.request_id!r} has no first token")
        self.reserve_kv(export.request_id, export.layout, export.num_tokens, max_new_tokens=sampling.max_tokens)
        try:
            for payload in export.layers:
                self.write_kv_layer(export.request_id, payload)
            self.add_request_from_kv(export.request_id, export.prompt_token_ids, export.first_token_id, sampling)
        except BaseException:
            self.release_kv(export.request_id)
            raise

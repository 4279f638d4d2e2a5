"""The prefill pool's Ray actor class: one engine, KV transfer clients to the decode workers.

A request's life on this worker:

    prefill_to(rid, prompt, sampling, decode address) ─► open a KV stream to the decode worker
    ─► engine.prefill_export(on_layer=stream.send_layer): each layer leaves as soon as it is computed
    ─► stream.finish(first_token_id) ─► the decode worker acknowledges (bytes, chunks, receive time)

`cancel(rid)` makes the next `on_layer` abort the stream (the decode worker frees its blocks). The
engine is not thread-safe: prefills run one at a time under a lock; the actor is threaded so that
cancel and telemetry answer while a prefill runs. Workers never route.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from orchestrator.core.types import SamplingParams
from workers.decode import WorkerError, WorkerSpec, build_engine, tls_config
from workers.kv_payload import KVLayout

log = logging.getLogger(__name__)


class PrefillCancelled(WorkerError):
    """The dispatcher cancelled this prefill (the client went away)."""


class PrefillWorker:
    """Owns an engine and one KV transfer client per decode worker address."""

    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=logging.WARNING)
        from orchestrator.runtime.power import make_power_meter

        self.spec = spec
        self.engine = build_engine(spec)
        self._engine_lock = threading.Lock()
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._handshaken: set[str] = set()
        self._queued_tokens: dict[str, int] = {}
        self._cancelled: set[str] = set()
        self._meter = make_power_meter()
        self._stats = {"prefills": 0, "prefill_failures": 0, "kv_bytes_sent": 0}

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "worker_id": self.spec.worker_id, "pool": self.spec.pool, "role": self.spec.role,
            "kv_address": None, "kv_layout": e.kv_layout, "kv_dtype": e.kv_dtype, "block_size": e.block_size,
            "num_total_blocks": e.num_total_blocks, "max_model_len": e.max_model_len,
            "eos_token_id": e.eos_token_id, "max_batch_size": e.config.max_batch_size,
            "vocab_size": int(e.model_config.vocab_size),
            "power_source": self._meter.source,
        }

    def encode(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def ping(self) -> bool:
        return True

    def _client(self, address: str, layout: KVLayout) -> Any:
        from workers.kv_transfer import KVTransferClient

        with self._lock:
            client = self._clients.get(address)
            if client is None:
                if not self.spec.auth_token:
                    raise WorkerError(f"{self.spec.worker_id}: the gRPC KV transport needs an auth token")
                client = KVTransferClient(address, auth_token=self.spec.auth_token, tls=tls_config(self.spec))
                self._clients[address] = client
        if address not in self._handshaken:
            client.handshake(layout)  # KVLayoutMismatch names the differing factor
            self._handshaken.add(address)
        return client

    def prefill_to(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                   decode_kv_address: str) -> dict[str, Any]:
        """Prefill and stream the KV to the decode worker that reserved it; returns the receiver's ack.

        Returns {"bytes": payload bytes received, "chunks", "receive_ms", "prefill_ms", "total_ms",
        "first_token_id"}. Raises the engine's typed errors, the transport's (KVLayoutMismatch,
        LeaseExpired, TransferCancelled, ...) or PrefillCancelled. On any failure the stream is aborted,
        so the decode worker frees its reservation."""
        t0 = time.perf_counter()
        ids = list(prompt_token_ids)
        with self._lock:
            self._queued_tokens[request_id] = len(ids)
        stream = None
        try:
            client = self._client(decode_kv_address, self.engine.kv_layout)
            stream = client.open_stream(request_id, self.engine.kv_layout, self.engine.kv_dtype, ids,
                                        deadline_s=self.spec.deadline_s, src_block_size=self.engine.block_size)

            def on_layer(payload: Any) -> None:
                if request_id in self._cancelled:
                    raise PrefillCancelled(f"prefill of {request_id!r} cancelled")
                stream.send_layer(payload)

            with self._engine_lock:
                if request_id in self._cancelled:
                    raise PrefillCancelled(f"prefill of {request_id!r} cancelled before it started")
                t1 = time.perf_counter()
                export = self.engine.prefill_export(request_id, ids, sampling, on_layer=on_layer)
                prefill_ms = (time.perf_counter() - t1) * 1e3
            ack = stream.finish(int(export.first_token_id))
        except BaseException:
            self._stats["prefill_failures"] += 1
            if stream is not None:
                try:
                    stream.abort()
                except Exception:  # the original error matters more
                    log.debug("abort after failure also failed for %s", request_id, exc_info=True)
            raise
        finally:
            with self._lock:
                self._queued_tokens.pop(request_id, None)
                self._cancelled.discard(request_id)
        self._stats["prefills"] += 1
        self._stats["kv_bytes_sent"] += int(ack.bytes_received)
        return {"bytes": int(ack.bytes_received), "chunks": int(ack.num_chunks), "receive_ms": float(ack.receive_ms),
                "prefill_ms": prefill_ms, "total_ms": (time.perf_counter() - t0) * 1e3,
                "first_token_id": int(export.first_token_id)}

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running prefill of request_id (its stream is aborted). True when known."""
        with self._lock:
            known = request_id in self._queued_tokens
            if known:
                self._cancelled.add(request_id)
        return known

    def telemetry(self) -> dict[str, Any]:
        with self._lock:
            queued = sum(self._queued_tokens.values())
            n = len(self._queued_tokens)
        return {"worker_id": self.spec.worker_id, "healthy": True, "queued_prefill_tokens": queued,
                "prefills_in_flight": n, "free_kv_blocks": 0, "total_kv_blocks": 0, "running": 0,
                "waiting": n, "power_w": self._meter.read_w(self.spec.worker_id),
                "power_source": self._meter.source, **self._stats}

    def check_leaks(self) -> str | None:
        """None when no prefill is tracked and the engine holds no blocks."""
        from orchestrator.core.types import TandemError

        with self._engine_lock:
            try:
                self.engine.assert_no_leaks()
            except TandemError as e:
                return f"{self.spec.worker_id}: {e}"
        with self._lock:
            if self._queued_tokens:
                return f"{self.spec.worker_id}: prefills still tracked: {sorted(self._queued_tokens)[:5]}"
        return None

    def shutdown(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

"""The decode pool's Ray actor class (also the colocated `both` role): one engine, one KV receiver.

A request's life on this worker, as a sequence of queues:

    remote prefill: reserve(rid) ─► KV arrives layer by layer over gRPC (KVTransferServer → engine KVSink)
                    ─► on_complete ─► engine.add_request_from_kv ─► engine loop ─► outbox ─► drain(rid)
    local prefill:  submit_local(rid) ─► engine.add_request ─► engine loop ─► outbox ─► drain(rid)
    either:         cancel(rid) frees the reservation / aborts the sequence and drops the outbox

The engine is not thread-safe; every engine call (the loop's `step()`, the gRPC threads' KVSink
writes, actor methods) holds `self._lock`. The actor is threaded (`max_concurrency`), so many
`drain` long-polls can wait at once. Workers never route: they do what the dispatcher asks.
Module import is light (no torch, no grpc) so the driver can create actors without loading them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.types import FinishReason, KVDtype, Role, SamplingParams, TandemError

log = logging.getLogger(__name__)
MAX_REMEMBERED_CANCELS = 4096  # ids kept to drop KV that lands after its request was cancelled


class WorkerError(TandemError):
    """A worker was asked something it cannot do (unknown request, wrong role, stopped)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker actor needs, as plain picklable data (built by the runtime from config)."""

    worker_id: str
    pool: str
    role: Role
    hardware: str
    accelerator: str | None = None
    model: str = "tiny"
    engine: str = "native"  # a key of ENGINES: native | vllm
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    kv_kind: str = "grpc"  # grpc | inprocess (inprocess: no receiver; colocated only)
    auth_token: str | None = None
    tls: dict[str, str | None] | None = None  # {cert_chain_path, private_key_path, root_ca_path, ...}
    lease_s: float = 30.0
    deadline_s: float = 60.0
    idle_wait_s: float = 0.02  # the engine loop's wait when there is nothing to step
    kv_bind_host: str | None = None  # KV server address; None = this Ray node's IP (127.0.0.1 locally)
    kv_port_range: tuple[int, int] | None = None  # [first, last] ports for the KV receiver; None = ephemeral


def kv_bind_host(spec: WorkerSpec) -> str:
    """Where the KV receiver listens: the spec's host, else the Ray node's IP (so prefill workers on
    other nodes can reach it), else loopback outside Ray."""
    if spec.kv_bind_host:
        return spec.kv_bind_host
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    return "127.0.0.1"


def start_kv_server(make: Callable[[int, int], Any], port_range: tuple[int, int] | None, who: str) -> Any:
    """Build and start a KV receiver: `make(port, data_port)` → an unstarted KVTransferServer.

    Without a range both ports are ephemeral. With [first, last] the receiver takes the first pair of
    consecutive free ports in it (gRPC on p, the data plane on p + 1; under TLS the data plane is off and
    p + 1 is left alone), so that a firewall opens one known range for every decode worker of a node.
    Raises WorkerError naming the range when no pair in it can be bound."""
    if port_range is None:
        server = make(0, 0)
        server.start()
        return server
    first, last = port_range
    errors = 0
    for port in range(first, last):
        server = make(port, port + 1)
        try:
            server.start()
        except (OSError, RuntimeError):  # taken (grpc raises RuntimeError or returns port 0 → OSError)
            server.stop(0)  # nothing is left listening or running from the failed try
            errors += 1
            continue
        return server
    raise WorkerError(f"{who}: no two consecutive free ports for the KV receiver in port_range "
                      f"[{first}, {last}] ({errors} tried); widen kv_transport.port_range")


def _native_engine(spec: WorkerSpec) -> Any:
    from workers.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=spec.model, **spec.engine_kwargs))


def _vllm_engine(spec: WorkerSpec) -> Any:
    from workers.vllm_engine import VLLMEngine, VLLMEngineConfig

    return VLLMEngine(VLLMEngineConfig.from_engine_kwargs(spec.model, spec.engine_kwargs))


# The engines a worker can run, by name; each imports its backend only when chosen.
ENGINES = {"native": _native_engine, "vllm": _vllm_engine}


def build_engine(spec: WorkerSpec) -> Any:
    """Construct the spec's engine (imports torch, and vLLM for `vllm`; call inside the actor)."""
    make = ENGINES.get(spec.engine)
    if make is None:
        raise WorkerError(f"{spec.worker_id}: unknown engine {spec.engine!r}; known: {', '.join(sorted(ENGINES))}")
    return make(spec)


def tls_config(spec: WorkerSpec) -> Any:
    if not spec.tls:
        return None
    from pathlib import Path

    from workers.kv_transfer import TLSConfig

    kw = {k: (Path(v) if v and k.endswith("_path") else v) for k, v in spec.tls.items()}
    return TLSConfig(**kw)


class _LockedSink:
    """The engine's KVSink behind the worker lock; reservations also cover the decode tokens."""

    def __init__(self, worker: DecodeWorker) -> None:
        self._w = worker

    @property
    def kv_layout(self) -> Any:
        return self._w.engine.kv_layout

    @property
    def kv_dtype(self) -> KVDtype:
        return self._w.engine.kv_dtype

    def reserve_kv(self, request_id: str, layout: Any, num_tokens: int) -> None:
        extra = self._w._pending_sampling.get(request_id)
        with self._w._lock:
            self._w.engine.reserve_kv(request_id, layout, num_tokens,
                                      max_new_tokens=extra.max_tokens if extra else 0)

    def write_kv_layer(self, request_id: str, payload: Any) -> None:
        with self._w._lock:
            self._w.engine.write_kv_layer(request_id, payload)

    def release_kv(self, request_id: str) -> None:
        with self._w._lock:
            self._w.engine.release_kv(request_id)


class _Outbox:
    """Tokens of one request not yet drained, plus incremental detokenization state."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # every generated token
        self.sent_tokens = 0
        self.sent_chars = 0
        self.finish: FinishReason | None = None
        self.error: str | None = None
        self.first_token_s: float | None = None


class DecodeWorker:
    """Owns an engine and (for remote prefill) a KV transfer server. Thin: no routing."""

    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=logging.WARNING)
        from orchestrator.runtime.power import make_power_meter

        self.spec = spec
        self.engine = build_engine(spec)
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._outboxes: dict[str, _Outbox] = {}
        self._pending_sampling: dict[str, SamplingParams] = {}  # reserved, waiting for KV
        self._cancelled: dict[str, None] = {}  # recently cancelled ids (insertion-ordered, bounded)
        self._stats = {"transfers_completed": 0, "transfers_failed": 0, "kv_bytes_received": 0,
                       "tokens_generated": 0}
        self._meter = make_power_meter()
        self._stop = False
        self.server: Any = None
        if spec.role is Role.DECODE and spec.kv_kind == "grpc":
            from workers.kv_transfer import KVTransferServer

            if not spec.auth_token:
                raise WorkerError(f"{spec.worker_id}: the gRPC KV transport needs an auth token")
            def make(port: int, data_port: int) -> Any:
                return KVTransferServer(
                    _LockedSink(self), self._on_complete, auth_token=spec.auth_token, host=kv_bind_host(spec),
                    port=port, data_port=data_port, tls=tls_config(spec), default_lease_s=spec.lease_s,
                    on_failure=self._on_failure,
                )

            self.server = start_kv_server(make, spec.kv_port_range, spec.worker_id)
        self._loop = threading.Thread(target=self._run, name=f"engine-{spec.worker_id}", daemon=True)
        self._loop.start()

    # ---- identity ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "worker_id": self.spec.worker_id, "pool": self.spec.pool, "role": self.spec.role,
            "kv_address": self.server.address if self.server is not None else None,
            "kv_layout": e.kv_layout, "kv_dtype": e.kv_dtype, "block_size": e.block_size,
            "num_total_blocks": e.num_total_blocks, "max_model_len": e.max_model_len,
            "eos_token_id": e.eos_token_id, "max_batch_size": e.config.max_batch_size,
            "vocab_size": int(e.model_config.vocab_size),
            "power_source": self._meter.source,
        }

    def encode(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def ping(self) -> bool:
        return not self._stop and self._loop.is_alive()

    # ---- requests ---------------------------------------------------------------------------------
    def reserve(self, request_id: str, layout: Any, num_tokens: int, sampling: SamplingParams,
                lease_s: float | None = None) -> None:
        """Hold KV blocks for prompt + max_tokens under a lease, before the prefill worker streams.

        Raises KVLayoutMismatch, KVCapacityError, DuplicateRequest, WorkerError (no receiver)."""
        if self.server is None:
            raise WorkerError(f"{self.spec.worker_id} has no KV receiver (role {self.spec.role.value})")
        sampling.validate()
        with self._lock:
            self._outboxes[request_id] = _Outbox()
            self._pending_sampling[request_id] = sampling
        try:
            self.server.reserve(request_id, layout, num_tokens, lease_s or self.spec.lease_s)
        except BaseException:
            with self._lock:
                self._outboxes.pop(request_id, None)
                self._pending_sampling.pop(request_id, None)
            raise

    def submit_local(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Prefill and decode here (the router chose local prefill). Raises the engine's typed errors."""
        with self._lock:
            self.engine.add_request(request_id, list(prompt_token_ids), sampling)
            self._outboxes[request_id] = _Outbox()
            self._cv.notify_all()

    def _on_complete(self, request_id: str, summary: Any) -> None:
        with self._lock:
            sampling = self._pending_sampling.pop(request_id, None)
            box = self._outboxes.get(request_id)
            if request_id in self._cancelled or sampling is None or box is None:
                self.engine.release_kv(request_id)
                return
            try:
                self.engine.add_request_from_kv(request_id, list(summary.prompt_token_ids),
                                                int(summary.first_token_id), sampling)
            except TandemError as e:
                self.engine.release_kv(request_id)
                box.error = f"{type(e).__name__}: {e}"
                self._stats["transfers_failed"] += 1
            else:
                self._stats["transfers_completed"] += 1
                self._stats["kv_bytes_received"] += int(summary.bytes_received)
            self._cv.notify_all()

    def _on_failure(self, request_id: str, err: TandemError) -> None:
        with self._lock:
            self._pending_sampling.pop(request_id, None)
            box = self._outboxes.get(request_id)
            if box is not None and request_id not in self._cancelled:
                box.error = f"KV transfer failed: {type(err).__name__}: {err}"
                self._stats["transfers_failed"] += 1
            self._cv.notify_all()

    def drain(self, request_id: str, wait_s: float = 0.5) -> dict[str, Any]:
        """Tokens generated since the last drain (long-poll up to wait_s for at least one).

        Returns {"token_ids", "text", "finish_reason" (FinishReason | None), "error" (str | None)}.
        The outbox is dropped once its finish or error has been returned."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while True:
                box = self._outboxes.get(request_id)
                if box is None:
                    return {"token_ids": [], "text": "", "finish_reason": FinishReason.CANCELLED,
                            "error": f"unknown request {request_id!r} on {self.spec.worker_id}"}
                if box.sent_tokens < len(box.ids) or box.finish is not None or box.error is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"token_ids": [], "text": "", "finish_reason": None, "error": None}
                self._cv.wait(left)
            new = box.ids[box.sent_tokens:]
            box.sent_tokens = len(box.ids)
            text = self.engine.tokenizer.decode(box.ids)
            done = box.finish is not None or box.error is not None
            if not done and text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                text = text[: len(text.rstrip("\ufffd"))]
            delta = text[box.sent_chars:]
            box.sent_chars = max(box.sent_chars, len(text))
            if done:
                del self._outboxes[request_id]
            return {"token_ids": new, "text": delta, "finish_reason": box.finish, "error": box.error}

    def cancel(self, request_id: str) -> bool:
        """Abort a request wherever it is here and free its blocks. True when it was known."""
        with self._lock:
            known = request_id in self._outboxes or request_id in self._pending_sampling
            self._cancelled[request_id] = None
            while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
                del self._cancelled[next(iter(self._cancelled))]
            self._pending_sampling.pop(request_id, None)
            self._outboxes.pop(request_id, None)
        if self.server is not None:
            self.server.cancel(request_id)  # frees a reservation / ends a live transfer (releases the blocks)
        with self._lock:
            self.engine.abort(request_id)
            self.engine.release_kv(request_id)
            self._cv.notify_all()
        return known

    # ---- the engine loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            with self._cv:
                if not self.engine.has_unfinished():
                    self._cv.wait(self.spec.idle_wait_s)
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # the engine guards its forward passes; this is a bug path
                    log.exception("engine step failed on %s", self.spec.worker_id)
                    for box in self._outboxes.values():
                        box.error = box.error or f"engine step failed: {e}"
                    self._cv.notify_all()
                    continue
                now = time.monotonic()
                for out in outs:
                    box = self._outboxes.get(out.request_id)
                    if box is None:  # cancelled meanwhile: the engine already dropped it or will
                        continue
                    if out.finish_reason is FinishReason.ERROR:
                        box.error = "the engine failed this request's forward pass"
                        continue
                    box.ids.append(int(out.token_id))
                    box.first_token_s = box.first_token_s or now
                    self._stats["tokens_generated"] += 1
                    if out.finish_reason is not None:
                        box.finish = out.finish_reason
                if outs:
                    self._cv.notify_all()
            # Outside the lock, give way: a thread releasing a lock and taking it straight back starves
            # the actor methods waiting on it (cancel, reserve, telemetry) until the batch drains.
            time.sleep(0 if outs else 0.001)

    # ---- telemetry, leaks, shutdown ---------------------------------------------------------------
    def telemetry(self) -> dict[str, Any]:
        with self._lock:
            e = self.engine
            return {
                "worker_id": self.spec.worker_id, "healthy": self.ping(),
                "free_kv_blocks": e.num_free_blocks, "total_kv_blocks": e.num_total_blocks,
                "running": e.num_running_requests, "waiting": e.num_waiting_requests,
                "reserved": len(self._pending_sampling), "outboxes": len(self._outboxes),
                "power_w": self._meter.read_w(self.spec.worker_id), "power_source": self._meter.source,
                **self._stats,
            }

    def check_leaks(self) -> str | None:
        """None when every KV block is free and nothing is tracked; else what leaked."""
        with self._lock:
            try:
                self.engine.assert_no_leaks()
            except TandemError as e:
                return f"{self.spec.worker_id}: {e}"
            if self._outboxes or self._pending_sampling:
                return (f"{self.spec.worker_id}: outboxes {sorted(self._outboxes)[:5]}, "
                        f"reserved {sorted(self._pending_sampling)[:5]}")
            self._cancelled.clear()
            return None

    def shutdown(self) -> None:
        """Stop the receiver (its reservations are released) and the engine loop."""
        if self.server is not None:
            self.server.stop()
        self._stop = True
        with self._cv:
            self._cv.notify_all()
        self._loop.join(5)
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

"""In-process fakes at the Ray seam, shipped so that tests (and the sim↔runtime contract test) can drive
the real `RayDispatcher` without Ray, torch or gRPC.

- `FakeActor(impl)`: `handle.method.remote(*args)` returns an awaitable, like a Ray actor handle.
- `FakeDecodeWorker` / `FakePrefillWorker`: the worker methods the dispatcher calls, with block-free
  bookkeeping; a decode request yields `max_tokens` tokens (token id 65 + i % 26), immediately or,
  with `hold=True`, only once the test calls `release(request_id)`; before that, `end_local_prefill(rid)`
  and `start_decoding(rid)` make its next drain frames say `"prefilled": True` / `"decoding": True`. With `hold_prefill=True` a
  remote prefill returns only once the test calls `finish_prefill(request_id)` on the prefill worker.
- `FakeDeployment(config, hold=..., hold_prefill=...)`: one fake worker per pool replica, named
  `<pool>-<i>` like the real `Deployment`, with the KV geometry of the config.

    disp = RayDispatcher(config, FakeDeployment(config))
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from orchestrator.config.models import TandemConfig
from orchestrator.core.types import FinishReason, Role, SamplingParams
from orchestrator.runtime.deployment import WorkerHandle


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            out = self.fn(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        return call()


class FakeActor:
    """Exposes `handle.method.remote(...)` → awaitable over a plain object."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.impl, name))


class FakeDecodeWorker:
    def __init__(self, worker_id: str, hold: bool = False) -> None:
        self.worker_id = worker_id
        self.hold = hold
        self.calls: list[tuple[str, str]] = []
        self.live: dict[str, SamplingParams] = {}
        self.reserved: set[str] = set()
        self.signals: dict[str, asyncio.Queue[str]] = {}
        self.healthy = True

    def _signals(self, rid: str) -> asyncio.Queue[str]:
        return self.signals.setdefault(rid, asyncio.Queue())

    def release(self, rid: str) -> None:
        """Let a held request produce its tokens."""
        self._signals(rid).put_nowait("finish")

    def end_local_prefill(self, rid: str) -> None:
        """A held request's local prefill is over: its next drain frame says so."""
        self._signals(rid).put_nowait("prefilled")

    def start_decoding(self, rid: str) -> None:
        """A held request joins the decode batch: its next drain frame says so (no tokens yet)."""
        self._signals(rid).put_nowait("decoding")

    def submit_local(self, rid: str, ids: list[int], sampling: SamplingParams) -> None:
        self.calls.append(("local", rid))
        self.live[rid] = sampling

    def reserve(self, rid: str, layout: Any, num_tokens: int, sampling: SamplingParams, lease_s: float) -> None:
        self.calls.append(("reserve", rid))
        self.reserved.add(rid)
        self.live[rid] = sampling

    async def drain(self, rid: str, wait_s: float) -> dict[str, Any]:
        sampling = self.live.get(rid)
        if sampling is None:
            return {"token_ids": [], "text": "", "finish_reason": FinishReason.CANCELLED, "error": f"unknown {rid}"}
        if self.hold:
            try:
                signal = await asyncio.wait_for(self._signals(rid).get(), wait_s)
            except TimeoutError:
                return {"token_ids": [], "text": "", "finish_reason": None, "error": None}
            if signal != "finish":
                return {"token_ids": [], "text": "", "finish_reason": None, "error": None, signal: True}
        self.signals.pop(rid, None)
        self.live.pop(rid, None)
        self.reserved.discard(rid)
        ids = [65 + i % 26 for i in range(sampling.max_tokens)]
        return {"token_ids": ids, "text": "".join(map(chr, ids)), "finish_reason": FinishReason.LENGTH,
                "error": None}

    def cancel(self, rid: str) -> bool:
        self.calls.append(("cancel", rid))
        self.reserved.discard(rid)
        return self.live.pop(rid, None) is not None

    def telemetry(self) -> dict[str, Any]:
        if not self.healthy:
            raise ConnectionError(f"{self.worker_id} is gone")
        return {"healthy": True, "running": len(self.live), "waiting": 0, "power_w": None}

    def encode(self, text: str) -> list[int]:
        return [256, *text.encode()]

    def check_leaks(self) -> str | None:
        return f"{self.worker_id}: {sorted(self.live)}" if self.live else None


class FakePrefillWorker:
    def __init__(self, worker_id: str, deployment: FakeDeployment, kv_bytes_per_token: int = 64,
                 hold: bool = False) -> None:
        self.worker_id = worker_id
        self.deployment = deployment
        self.kv_bytes_per_token = kv_bytes_per_token
        self.hold = hold
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[tuple[str, str]] = []
        self.healthy = True

    def finish_prefill(self, rid: str) -> None:
        """Let a held prefill return (its KV has landed on the decode worker)."""
        self.gates.setdefault(rid, asyncio.Event()).set()

    async def prefill_to(self, rid: str, ids: list[int], sampling: SamplingParams, address: str) -> dict[str, Any]:
        decode = self.deployment.by_address[address]
        if rid not in decode.reserved:
            raise RuntimeError(f"prefill of {rid} started before {decode.worker_id} reserved its KV")
        self.calls.append(("prefill", rid))
        if self.hold:
            await self.gates.setdefault(rid, asyncio.Event()).wait()
            self.gates.pop(rid, None)
        return {"bytes": self.kv_bytes_per_token * len(ids), "receive_ms": 1.0, "total_ms": 1.0}

    def cancel(self, rid: str) -> bool:
        self.calls.append(("cancel", rid))
        if self.hold:
            self.finish_prefill(rid)  # a held prefill is aborted: it returns
        return False

    def telemetry(self) -> dict[str, Any]:
        if not self.healthy:
            raise ConnectionError(f"{self.worker_id} is gone")
        return {"healthy": True, "power_w": None}

    def encode(self, text: str) -> list[int]:
        return [256, *text.encode()]

    def check_leaks(self) -> str | None:
        return None


class _Spec:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id


class FakeDeployment:
    """What `RayDispatcher` reads of a `Deployment`, over fake workers (`impls[worker_id]`)."""

    def __init__(self, config: TandemConfig, *, hold: bool = False, hold_prefill: bool = False,
                 max_model_len: int | None = None, vocab_size: int = 259) -> None:
        self.config = config
        self.workers: dict[str, WorkerHandle] = {}
        self.impls: dict[str, Any] = {}
        self.by_address: dict[str, FakeDecodeWorker] = {}
        self.max_model_len = max_model_len or config.model.max_model_len
        self.vocab_size = vocab_size
        for pool in config.pools:
            for i in range(pool.replicas):
                wid = f"{pool.name}-{i}"
                impl: Any
                if pool.role is Role.PREFILL:
                    impl = FakePrefillWorker(wid, self, hold=hold_prefill)
                    address = None
                else:
                    impl = FakeDecodeWorker(wid, hold)
                    address = f"fake://{wid}"
                    self.by_address[address] = impl
                info = {"num_total_blocks": 0 if pool.role is Role.PREFILL else (pool.engine.num_kv_blocks or 256),
                        "block_size": config.pool_block_size(pool), "kv_layout": None, "kv_address": address,
                        "max_model_len": self.max_model_len, "vocab_size": vocab_size}
                self.impls[wid] = impl
                self.workers[wid] = WorkerHandle(_Spec(wid), pool, FakeActor(impl), info)
        self.workers = dict(sorted(self.workers.items()))

    def decode_capable(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.role is not Role.PREFILL]

    def check_leaks(self) -> list[str]:
        return [r for r in (i.check_leaks() for i in self.impls.values()) if r]

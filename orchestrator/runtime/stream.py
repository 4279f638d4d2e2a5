"""One request's token stream, drained from its decode worker (the `GenerationStream` the frontend reads).

Split from `dispatcher.py`: the dispatcher places a request and hands back a `RayStream`; the stream
long-polls the decode worker, reports phase changes and finishes to the dispatcher's ledger, records the
latency metrics, and cancels the request on both workers when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from orchestrator.core.types import FinishReason
from orchestrator.runtime.api_types import GenerationRequest, RequestFailed, TokenChunk
from orchestrator.runtime.deployment import WorkerHandle

if TYPE_CHECKING:
    from orchestrator.runtime.dispatcher import RayDispatcher

log = logging.getLogger(__name__)

DRAIN_WAIT_S = 0.5  # the decode worker's long-poll: return at once with tokens, else after this


def _err(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        e = cause
    return f"{type(e).__name__}: {e}"


class RayStream:
    """One request's tokens, drained from its decode worker (a GenerationStream)."""

    def __init__(self, disp: RayDispatcher, gen: GenerationRequest, decode: WorkerHandle,
                 prefill: WorkerHandle | None, t0: float) -> None:
        self.request_id = gen.request_id
        self.gen = gen
        self._d = disp
        self.decode = decode
        self.prefill = prefill
        self.prefill_task: asyncio.Future[dict[str, Any]] | None = None
        self._t0 = t0
        self._done = False
        self._cancel_task: asyncio.Future[None] | None = None
        self._labels = (disp.model_name, decode.pool.name, "remote" if prefill else "local")

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        m = self._d.metrics
        n_out = 0
        first_s: float | None = None
        last_s = self._t0
        try:
            while True:
                res = await self.decode.actor.drain.remote(self.request_id, DRAIN_WAIT_S)
                if res["error"]:
                    raise RequestFailed(f"{self.request_id} failed on {self.decode.worker_id}: {res['error']}")
                if res["token_ids"] or res.get("decoding"):
                    self._d._decoding(self.request_id)
                elif res.get("prefilled"):
                    self._d._release_ledger(self.request_id, prefill_only=True)
                if not res["token_ids"] and res["finish_reason"] is None:
                    if self.prefill_task is not None and self.prefill_task.done():
                        exc = self.prefill_task.exception()
                        if exc is not None:
                            raise RequestFailed(f"prefill of {self.request_id} on {self.prefill.worker_id} "  # type: ignore[union-attr]
                                                f"failed: {_err(exc)}")
                    continue
                now = time.monotonic()
                k = len(res["token_ids"])
                if k:
                    if first_s is None:
                        first_s = now
                        m.ttft_s.labels(*self._labels).observe(now - self._t0)
                        if k > 1:
                            for _ in range(k - 1):
                                m.itl_s.labels(*self._labels).observe(0.0)
                    else:
                        for _ in range(k):  # a long-poll may bring several tokens: spread the gap
                            m.itl_s.labels(*self._labels).observe((now - last_s) / k)
                    last_s = now
                    n_out += k
                finish = res["finish_reason"]
                yield TokenChunk(list(res["token_ids"]), res["text"], finish)
                if finish is not None:
                    self._record_finish(finish, n_out, first_s, now)
                    return
        except (RequestFailed, asyncio.CancelledError, GeneratorExit):
            await self.cancel()
            raise
        except Exception as e:  # a worker died or Ray failed: a typed failure for the frontend
            await self.cancel()
            raise RequestFailed(f"{self.request_id} failed on {self.decode.worker_id}: {_err(e)}") from None
        finally:
            if not self._done:
                await self.cancel()

    def _record_finish(self, finish: FinishReason, n_out: int, first_s: float | None, end_s: float) -> None:
        d, m = self._d, self._d.metrics
        self._done = True
        m.e2e_s.labels(*self._labels).observe(end_s - self._t0)
        m.prompt_tokens.labels(*self._labels).inc(len(self.gen.prompt_token_ids))
        m.generation_tokens.labels(*self._labels).inc(n_out)
        m.request_success.labels(d.model_name, finish.value).inc()
        if first_s is not None:
            d.ttft_s.append(first_s - self._t0)
            if n_out > 1:
                tpot = (end_s - first_s) / (n_out - 1)
                d.tpot_s.append(tpot)
                m.tpot_s.labels(*self._labels).observe(tpot)
        d._finished(self.request_id)

    async def cancel(self) -> None:
        """Free the request on both workers (idempotent). The work runs in its own task, so a caller
        that is itself being cancelled (a client that went away) cannot interrupt it half-way."""
        if self._cancel_task is None:
            if self._done:
                return
            self._done = True
            self._cancel_task = asyncio.ensure_future(self._do_cancel())
        await asyncio.shield(self._cancel_task)

    async def _do_cancel(self) -> None:
        calls = [self.decode.actor.cancel.remote(self.request_id)]
        if self.prefill is not None:
            calls.append(self.prefill.actor.cancel.remote(self.request_id))
        try:
            await asyncio.gather(*calls)
        except Exception as e:
            log.warning("cancel of %s: %s", self.request_id, _err(e))
        if self.prefill_task is not None:
            # let the prefill finish aborting before the ledger forgets it; its failure is expected
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self.prefill_task), 30)
        self._d._finished(self.request_id)


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]

"""A fake `ServingBackend` for frontend tests: byte tokenizer, deterministic 'model', real cancellation.

Token i+1 = (sum of all tokens so far * 31 + 7) % 26 + 97 (a lowercase letter), so outputs are
deterministic and depend on the prompt. Overload is a real in-flight cap; every started request is
tracked until it finishes or is cancelled, so tests can check that nothing leaked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from orchestrator.core.types import FinishReason
from orchestrator.runtime.api_types import GenerationRequest, Overloaded, RequestFailed, TokenChunk


def fake_next_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + 7) % 26 + 97


class FakeStream:
    def __init__(self, backend: FakeBackend, req: GenerationRequest) -> None:
        self.request_id = req.request_id
        self._backend = backend
        self._req = req
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        ids = list(self._req.prompt_token_ids)
        try:
            for i in range(self._req.sampling.max_tokens):
                if self.cancelled:
                    return
                await asyncio.sleep(self._backend.token_delay_s)
                if self._backend.fail_after is not None and i >= self._backend.fail_after:
                    raise RequestFailed(f"{self.request_id}: decode worker died")
                tok = fake_next_token(ids)
                ids.append(tok)
                last = i == self._req.sampling.max_tokens - 1
                yield TokenChunk([tok], chr(tok), FinishReason.LENGTH if last else None)
        finally:
            self._backend.live.discard(self.request_id)

    async def cancel(self) -> None:
        self.cancelled = True
        self._backend.cancelled.add(self.request_id)
        self._backend.live.discard(self.request_id)


class FakeBackend:
    def __init__(self, max_in_flight: int = 8, token_delay_s: float = 0.0, max_model_len: int = 64) -> None:
        self.max_in_flight = max_in_flight
        self.token_delay_s = token_delay_s
        self._max_model_len = max_model_len
        self.live: set[str] = set()
        self.cancelled: set[str] = set()
        self.submitted: list[GenerationRequest] = []
        self.fail_after: int | None = None  # raise RequestFailed after this many tokens

    @property
    def model_name(self) -> str:
        return "tiny"

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def encode(self, text: str) -> list[int]:
        return list(text.encode())

    async def submit(self, request: GenerationRequest) -> FakeStream:
        if len(self.live) >= self.max_in_flight:
            raise Overloaded(f"{len(self.live)} requests in flight (cap {self.max_in_flight})", retry_after_s=2.0,
                             reason="queue_full")
        self.live.add(request.request_id)
        self.submitted.append(request)
        return FakeStream(self, request)

    async def health(self) -> dict[str, Any]:
        return {"ok": True, "in_flight": len(self.live)}


def expected_text(prompt: str, max_tokens: int) -> str:
    ids = list(prompt.encode())
    out = []
    for _ in range(max_tokens):
        t = fake_next_token(ids)
        ids.append(t)
        out.append(chr(t))
    return "".join(out)

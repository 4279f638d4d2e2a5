"""The seam between the HTTP frontend and whatever serves requests (Ray dispatcher or a test fake).

The frontend parses and validates OpenAI-style requests, then talks only to a `ServingBackend`:
`encode` a prompt, `submit` a `GenerationRequest` and iterate the returned `GenerationStream`
(token ids plus text deltas), `cancel` it when the client goes away. Errors the backend raises on
purpose are the typed ones below; the frontend maps each to an HTTP status and an OpenAI error body.

Pure Python: no torch, no ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.core.types import FinishReason, SamplingParams, TandemError


class Overloaded(TandemError):
    """Admission refused the request now (HTTP 429); `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: float = 1.0, reason: str = "overloaded") -> None:
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)
        self.reason = reason


class PromptTooLongError(TandemError):
    """The prompt plus max_tokens does not fit the model's context length (HTTP 400)."""


class BackendUnavailable(TandemError):
    """No healthy worker can serve the request (HTTP 503)."""


class RequestFailed(TandemError):
    """A request failed inside the cluster after it was admitted (HTTP 500 / SSE error event)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One admitted-to-be request as the frontend hands it to the backend."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    sla_class: str | None = None


@dataclass
class TokenChunk:
    """Tokens produced since the previous chunk, with their detokenized text delta."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class RequestTimings:
    """What the backend measured for one finished request (seconds, wall clock)."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


class GenerationStream(Protocol):
    """Async iterator of `TokenChunk`s; the last one carries a finish_reason."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[TokenChunk]: ...

    async def cancel(self) -> None:
        """Abort the request everywhere and free its KV blocks. Idempotent."""


class ServingBackend(Protocol):
    """What the HTTP frontend needs from the cluster."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    async def encode(self, text: str) -> list[int]:
        """Tokenize with the served model's tokenizer (no special tokens added)."""

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        """Admit, route and start a request. Raises Overloaded, PromptTooLongError, BackendUnavailable."""

    async def health(self) -> dict[str, Any]:
        """{"ok": bool, ...details}; ok is False when a pool has no live worker."""


class InvalidRequestError(TandemError):
    """The cluster refused the request as malformed for this deployment (HTTP 400), e.g. an unknown SLA class."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

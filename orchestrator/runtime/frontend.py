"""The OpenAI-compatible HTTP frontend (FastAPI), over any `ServingBackend`.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE with `stream: true`, ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics. Every error is an OpenAI error body;
overload is 429 with a Retry-After header. A streaming client that disconnects cancels its request
(the backend frees its KV blocks everywhere). Responses carry a non-standard `token_ids` field per
choice (and per streamed chunk) so callers can compare outputs token for token.

The app runs in the driver process next to the dispatcher: the dispatcher is asyncio code that
awaits Ray object refs, so keeping both in one event loop avoids a second hop and a second actor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from orchestrator.core.types import FinishReason
from orchestrator.runtime.api_types import (
    BackendUnavailable,
    GenerationRequest,
    GenerationStream,
    InvalidRequestError,
    Overloaded,
    PromptTooLongError,
    RequestFailed,
    ServingBackend,
)
from orchestrator.runtime.metrics import TandemMetrics
from orchestrator.runtime.openai_protocol import (
    ApiError,
    ParsedRequest,
    decode_json,
    parse_chat,
    parse_completion,
)

log = logging.getLogger(__name__)

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Frontend:
    def __init__(self, backend: ServingBackend, metrics: TandemMetrics | None, default_max_tokens: int) -> None:
        self.backend = backend
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self._bg: set[asyncio.Task[None]] = set()

    # -- helpers -------------------------------------------------------------------------------

    def _spawn_cancel(self, stream: GenerationStream) -> None:
        """Cancel in a fresh task: the current one may itself be cancelled (client went away)."""
        task = asyncio.get_running_loop().create_task(stream.cancel())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _start(self, parsed: ParsedRequest, prefix: str) -> tuple[GenerationStream, int, str]:
        if parsed.model != self.backend.model_name:
            raise ApiError(404, f"model {parsed.model!r} does not exist; this server serves "
                                f"{self.backend.model_name!r}", param="model", code="model_not_found")
        ids = parsed.prompt_token_ids
        if ids is None:
            ids = await self.backend.encode(parsed.prompt_text or "")
            if not ids:
                raise ApiError(400, "prompt encodes to zero tokens", param="prompt", code="invalid_value")
        max_len = self.backend.max_model_len
        if len(ids) + parsed.sampling.max_tokens > max_len:
            raise ApiError(400, f"this model's maximum context length is {max_len} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for max_tokens={parsed.sampling.max_tokens} "
                                f"({len(ids) + parsed.sampling.max_tokens} in all): shorten the prompt or "
                                f"lower max_tokens", param="max_tokens" if len(ids) < max_len else "prompt",
                           code="context_length_exceeded")
        rid = f"{prefix}-{uuid.uuid4().hex[:20]}"
        req = GenerationRequest(rid, list(ids), parsed.sampling, parsed.sla_class)
        try:
            stream = await self.backend.submit(req)
        except Overloaded as e:
            raise ApiError(429, str(e), type="rate_limit_error", code=e.reason,
                           headers={"Retry-After": str(max(1, round(e.retry_after_s)))}) from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param, code=e.code) from None
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except BackendUnavailable as e:
            raise ApiError(503, str(e), type="server_error", code="unavailable") from None
        return stream, len(ids), rid

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- handlers ------------------------------------------------------------------------------

    async def handle(self, request: Request, chat: bool) -> Response:
        try:
            data = decode_json(await request.body())
            parser = parse_chat if chat else parse_completion
            parsed = parser(data, self.default_max_tokens)
            stream, n_prompt, rid = await self._start(parsed, "chatcmpl" if chat else "cmpl")
        except ApiError as e:
            return _error_response(e)
        if parsed.stream:
            return StreamingResponse(self._sse_body(stream, n_prompt, rid, parsed, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        return await self._full_body(stream, n_prompt, rid, parsed, chat)

    async def _full_body(self, stream: GenerationStream, n_prompt: int, rid: str, parsed: ParsedRequest,
                         chat: bool) -> Response:
        text: list[str] = []
        ids: list[int] = []
        finish: FinishReason | None = None
        try:
            async for chunk in stream:
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                finish = chunk.finish_reason or finish
        except RequestFailed as e:
            return _error_response(ApiError(500, str(e), type="server_error", code="request_failed"))
        except BaseException:
            self._spawn_cancel(stream)
            raise
        created = int(time.time())
        reason = _FINISH.get(finish, "stop") if finish else None
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                      "finish_reason": reason, "logprobs": None, "token_ids": ids}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None,
                      "token_ids": ids}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": parsed.model,
                             "choices": [choice], "usage": self._usage(n_prompt, len(ids))})

    async def _sse_body(self, stream: GenerationStream, n_prompt: int, rid: str, parsed: ParsedRequest,
                        chat: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        n_out = 0
        finished = False

        def frame(text: str, ids: list[int], finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None,
                                          "token_ids": ids}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": ids}
            return {"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [choice]}

        try:
            if chat:
                yield _sse(frame("", [], None, role=True))
            async for chunk in stream:
                n_out += len(chunk.token_ids)
                reason = _FINISH.get(chunk.finish_reason) if chunk.finish_reason else None
                if chunk.token_ids or reason:
                    yield _sse(frame(chunk.text, chunk.token_ids, reason))
            finished = True
            if parsed.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [],
                            "usage": self._usage(n_prompt, n_out)})
        except RequestFailed as e:
            finished = True
            yield _sse(ApiError(500, str(e), type="server_error", code="request_failed").body())
        finally:
            if not finished:  # the client went away (or the server is shutting down): free everything
                self._spawn_cancel(stream)
        yield b"data: [DONE]\n\n"


def create_app(backend: ServingBackend, metrics: TandemMetrics | None = None,
               default_max_tokens: int = 16) -> FastAPI:
    """Build the FastAPI app. `metrics` is rendered at /metrics (an empty registry when None)."""
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)
    fe = _Frontend(backend, metrics, default_max_tokens)
    app.state.frontend = fe

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await fe.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await fe.handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "max_model_len": backend.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        info = await backend.health()
        return JSONResponse(info, status_code=200 if info.get("ok") else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        if metrics is None:
            return Response(b"", media_type="text/plain")
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                                        code="method_not_allowed"))

    return app

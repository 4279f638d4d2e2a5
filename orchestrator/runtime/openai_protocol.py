"""OpenAI-compatible request parsing and response/error bodies (pure Python + pydantic).

Requests are validated here, at the edge, into typed values; anything malformed becomes an
`ApiError` carrying the HTTP status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`.

Chat template of the tiny model (documented, role-tagged, no special tokens):

    <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}\n ... <|assistant|>\n

each message as `<|{role}|>\n{content}\n`, then the generation prompt `<|assistant|>\n`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from orchestrator.core.types import SamplingParams, TandemError

CHAT_ROLES = ("system", "user", "assistant")


class ApiError(TandemError):
    """An error the API returns to the client, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, …) are accepted and ignored, as servers commonly do;
    # known ones are type-checked strictly (no "12" for an int).
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: str
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = Field(default=None, strict=False)
    top_p: float | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: StrictBool = False
    sla_class: str | None = None  # Tandem extension: the SLA class name in the serving config


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: StrictBool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Common):
    messages: list[ChatMessage]


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: prompt (text or ids), sampling, and how to answer."""

    model: str
    prompt_text: str | None
    prompt_token_ids: list[int] | None
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    sla_class: str | None


def _pydantic_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or None
    where = ".".join(str(p) for p in err.get("loc", ()))
    return ApiError(400, f"invalid request: '{where}': {err.get('msg')}", param=loc, code="invalid_type")


def decode_json(raw: bytes) -> dict[str, Any]:
    """Parse the body; a non-object or malformed JSON is a 400."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


def render_chat(messages: list[ChatMessage]) -> str:
    """The tiny model's chat template (see module docstring)."""
    parts = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


def _sampling(body: _Common, default_max_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (got {body.n})", param="n", code="unsupported_value")
    if body.stop:
        raise ApiError(400, "stop strings are not supported; use max_tokens", param="stop", code="unsupported_value")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens", code="invalid_value")
    temperature = 0.0 if body.temperature is None else float(body.temperature)
    if not math.isfinite(temperature) or temperature < 0.0 or temperature > 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature",
                       code="invalid_value")
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not (0.0 < top_p <= 1.0):
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, f"seed must be >= 0, got {body.seed}", param="seed", code="invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed,
                          ignore_eos=body.ignore_eos)


def parse_completion(data: dict[str, Any], default_max_tokens: int = 16) -> ParsedRequest:
    """Validate a /v1/completions body."""
    try:
        body = CompletionBody.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(e) from None
    text: str | None = None
    ids: list[int] | None = None
    prompt = body.prompt
    if isinstance(prompt, str):
        text = prompt
    elif prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
        text = str(prompt[0])
    else:
        ids = [int(p) for p in prompt]
    if (text is not None and text == "") or (ids is not None and not ids):
        raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo", code="unsupported_value")
    return ParsedRequest(body.model, text, ids, _sampling(body, default_max_tokens), body.stream,
                         bool(body.stream_options and body.stream_options.include_usage), body.sla_class)


def parse_chat(data: dict[str, Any], default_max_tokens: int = 16) -> ParsedRequest:
    """Validate a /v1/chat/completions body and render its messages with the chat template."""
    try:
        body = ChatBody.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(e) from None
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message", param="messages", code="invalid_value")
    return ParsedRequest(body.model, render_chat(body.messages), None, _sampling(body, default_max_tokens),
                         body.stream, bool(body.stream_options and body.stream_options.include_usage),
                         body.sla_class)

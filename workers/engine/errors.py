"""Typed errors of the engine. Every one subclasses `TandemError`; messages say what to do.

Sampling errors reuse `InvalidSamplingParams` (raised by `SamplingParams.validate()`); KV hand-off
errors reuse `KVLayoutMismatch`, `KVCapacityError` and `KVImportError` from `workers.kv_payload`.
"""

from __future__ import annotations

from orchestrator.core.types import TandemError


class UnknownModel(TandemError, ValueError):
    """The model is neither a preset name nor an existing local directory."""


class CheckpointError(TandemError):
    """A local checkpoint is missing a file or a file is malformed. The message names the path."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class InvalidRequest(TandemError, ValueError):
    """A request's prompt cannot be served (empty, token ids outside the vocabulary, ...)."""


class PromptTooLong(InvalidRequest):
    """The prompt does not leave room for one generated token within the engine's context length."""


class DuplicateRequest(TandemError, ValueError):
    """A request id is already known to the engine (waiting, running or holding reserved KV)."""


class EngineCapacityError(TandemError):
    """The engine has (or will ever have) too few KV blocks or batch slots for the request."""


class KVLeakError(TandemError):
    """A KV block is still held or a request is still tracked when none should be."""

"""Per-request state inside the engine (no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from orchestrator.core.types import SamplingParams
from workers.engine.errors import InvalidRequest, PromptTooLong


def check_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt as a list, or InvalidRequest / PromptTooLong naming what is wrong (any engine)."""
    ids = list(prompt_token_ids)
    if not ids:
        raise InvalidRequest("the prompt is empty; give at least one token")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"prompt token id {t!r} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise PromptTooLong(
            f"prompt has {len(ids)} tokens; this engine's context is {max_model_len} tokens "
            f"(prompt + generated), so a prompt may have at most {max_model_len - 1}"
        )
    return ids


class SeqState(enum.Enum):
    WAITING = "waiting"  # queued for prefill; holds no blocks
    RESERVED = "reserved"  # KV import in progress: holds blocks, not scheduled
    READY = "ready"  # KV imported; waits for a batch slot to emit its first token and decode
    RUNNING = "running"  # in the decode batch


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    state: SeqState
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache
    pending_first: int | None = None  # imported first token, emitted by the next step
    reserved_tokens: int = 0  # KV import: tokens the reservation holds
    written: list[bytearray] = field(default_factory=list)  # KV import: per layer, 1 per written token
    serial: int = field(default_factory=itertools.count().__next__)  # unique per Sequence object in a process

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)

    @property
    def last_token(self) -> int:
        return self.outputs[-1] if self.outputs else self.prompt[-1]

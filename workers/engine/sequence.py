"""Per-request state inside the engine (no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from orchestrator.core.types import SamplingParams


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

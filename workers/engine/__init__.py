"""The native model runner both pools use: Llama-family model, paged FP8 KV cache, batching, sampling,
and KV export/import for disaggregation. Reading path: README.md."""

from workers.engine.config import EngineConfig, TokenOutput
from workers.engine.engine import Engine

__all__ = ["Engine", "EngineConfig", "TokenOutput"]

"""Model shapes: the numbers the cost model, the router and the engine's presets share.

`PRESETS` names the random-weight shape presets (`llama-3.2-1b-shape`, …) and the built-in `tiny`
model. The engine builds its preset models from these; the cost model counts FLOPs and bytes
from them (the seed paper's equations 2–5), so both agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int  # l
    hidden_size: int  # h
    intermediate_size: int  # a*h
    num_heads: int  # H = h / d
    num_kv_heads: int  # H / g
    head_dim: int  # d
    vocab_size: int  # v
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False

    @property
    def gqa_group(self) -> int:
        """g: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def linear_params(self) -> int:
        """Parameters of every linear layer except the LM head (QKV, O, gate, up, down) × layers."""
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_heads * d * h
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (q + kv + o + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def kv_elements_per_token(self) -> int:
        """K and V elements one token adds to the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def prefill_flops(self, num_tokens: int, context_tokens: int = 0) -> float:
        """Matmul FLOPs of a prefill of num_tokens new tokens after context_tokens cached ones.

        Seed paper eq. 2 (causal attention masking skipped): linear 2·s·(params) + LM head (last
        token only when serving, so 2·v·h) + attention 2·s²·h·l (QK and PV over the causal half).
        """
        s, c = num_tokens, context_tokens
        linear = 2.0 * s * self.linear_params
        attn = 2.0 * self.num_layers * self.num_heads * self.head_dim * (s * s + 2.0 * s * c)
        lm_head = 2.0 * self.lm_head_params
        return linear + attn + lm_head

    def decode_flops(self, context_tokens: list[int] | tuple[int, ...]) -> float:
        """Matmul FLOPs of one decode step for a batch with the given context lengths (eq. 5)."""
        b = len(context_tokens)
        attn = 4.0 * self.num_layers * self.num_heads * self.head_dim * float(sum(context_tokens))
        return 2.0 * b * (self.linear_params + self.lm_head_params) + attn


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=259, max_position_embeddings=512, rope_theta=10000.0,
    ),
    "llama-3.2-1b-shape": ModelShape(
        name="llama-3.2-1b-shape", num_layers=16, hidden_size=2048, intermediate_size=8192, num_heads=32,
        num_kv_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    ),
    "llama-3.1-8b-shape": ModelShape(
        name="llama-3.1-8b-shape", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=128256,
    ),
    "llama-3.1-70b-shape": ModelShape(
        name="llama-3.1-70b-shape", num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64,
        num_kv_heads=8, head_dim=128, vocab_size=128256,
    ),
}


class UnknownModelShape(KeyError):
    pass


def get_shape(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelShape(f"unknown model shape {name!r}; known: {', '.join(sorted(PRESETS))}") from None

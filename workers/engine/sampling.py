"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded draw depends only on (seed, token position): the uniform number comes from a generator
seeded with a hash of both, and the token is found by inverse-CDF over a deterministic ordering. So a
request gets the same tokens alone, batched, or prefilled on one engine and decoded on another.
"""

from __future__ import annotations

import hashlib

import torch

from orchestrator.core.types import SamplingParams


def position_seed(seed: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, token ids) of the candidates after temperature, top-k and top-p, most likely first."""
    scaled = logits.float() / params.temperature
    order = torch.argsort(scaled, descending=True, stable=True)
    vals = scaled[order]
    if params.top_k > 0:
        vals, order = vals[: params.top_k], order[: params.top_k]
    probs = torch.softmax(vals, dim=-1)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        keep = int(torch.searchsorted(cum, torch.tensor([params.top_p])).item()) + 1  # smallest set reaching p
        probs, order = probs[:keep], order[:keep]
        probs = probs / probs.sum()
    return probs, order


def sample_token(
    logits: torch.Tensor, params: SamplingParams, position: int, fallback: torch.Generator
) -> int:
    """Pick the token at `position` from logits [V] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs, order = filtered_probs(logits.cpu(), params)
    if params.seed is not None:
        gen = torch.Generator().manual_seed(position_seed(params.seed, position))
    else:
        gen = fallback
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    cdf = torch.cumsum(probs.double(), dim=-1)
    idx = min(int(torch.searchsorted(cdf, u * cdf[-1]).item()), probs.shape[0] - 1)
    return int(order[idx].item())

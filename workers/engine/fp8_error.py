"""Measure FP8 error against the non-FP8 baseline (the logic behind scripts/fp8_error_table.py).

Linear modes: for each FP8 mode × format × rounding, an engine with the same weights (same model and
seed) computes teacher-forced logits over the evaluation prompts; we report the relative logit error
||L - L_ref||_F / ||L_ref||_F and the top-1 agreement (fraction of positions whose argmax matches)
against `LinearMode.BF16` at the same compute dtype. KV: the relative round-trip error of the model's
real K and V through each KV dtype, and how many greedy tokens match the bf16-KV run before diverging.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from orchestrator.core.types import ComputeDtype, FP8Format, KVDtype, LinearMode, Rounding, SamplingParams
from workers.engine import fp8 as fp8q
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine

FP8_MODES = [
    (mode, fmt, rnd)
    for mode in (LinearMode.FP8_DYNAMIC, LinearMode.FP8_STATIC)
    for fmt in (FP8Format.E4M3, FP8Format.E5M2)
    for rnd in (Rounding.NEAREST, Rounding.STOCHASTIC)
]


def eval_prompts(vocab: int, num_prompts: int = 4, length: int = 48, seed: int = 1) -> list[list[int]]:
    """Deterministic pseudo-random prompts (byte ids, so every preset's tokenizer range holds them)."""
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 256)
    return [torch.randint(0, hi, (length,), generator=g).tolist() for _ in range(num_prompts)]


def _logits(engine: Engine, prompts: list[list[int]]) -> torch.Tensor:
    return torch.cat([engine.prompt_logits(p) for p in prompts])


def _compare(ref: torch.Tensor, got: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """Relative logit error, top-1 agreement, and top-1 agreement with each position's input token masked out
    (random models with tied embeddings predict their input token almost everywhere, which makes plain top-1
    trivial; the masked variant compares the next choice)."""
    rel = float((got - ref).norm() / ref.norm())
    same = got.argmax(-1) == ref.argmax(-1)
    rows = torch.arange(ref.shape[0])
    ref_m, got_m = ref.clone(), got.clone()
    ref_m[rows, inputs] = float("-inf")
    got_m[rows, inputs] = float("-inf")
    return {
        "rel_logit_err": rel,
        "top1_agreement": float(same.float().mean()),
        "top1_agreement_excl_input": float((got_m.argmax(-1) == ref_m.argmax(-1)).float().mean()),
        "baseline_top1_is_input": float((ref.argmax(-1) == inputs).float().mean()),
    }


def linear_mode_errors(
    base: EngineConfig,
    prompts: list[list[int]],
    calibration: list[list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per FP8 mode (plus a bf16-compute row when the base computes in float32)."""
    def build(**kw: Any) -> Engine:
        from dataclasses import replace

        return Engine(replace(base, calibration_prompts=calibration, **kw))

    inputs = torch.tensor([t for p in prompts for t in p])
    ref_engine = build(linear_mode=LinearMode.BF16)
    ref = _logits(ref_engine, prompts)
    del ref_engine
    rows: list[dict[str, Any]] = []
    if base.dtype is ComputeDtype.FLOAT32:
        eng = build(linear_mode=LinearMode.BF16, dtype=ComputeDtype.BF16)
        rows.append({"linear": "bf16 (bf16 compute)", "format": "-", "rounding": "-",
                     **_compare(ref, _logits(eng, prompts), inputs)})
        del eng
    for mode, fmt, rnd in FP8_MODES:
        eng = build(linear_mode=mode, fp8_format=fmt, rounding=rnd)
        row = {"linear": mode.value, "format": fmt.value, "rounding": rnd.value,
               **_compare(ref, _logits(eng, prompts), inputs)}
        rows.append(row)
        if progress is not None:
            progress(f"{mode.value} {fmt.value} {rnd.value}: rel {row['rel_logit_err']:.4f} "
                     f"top-1 {row['top1_agreement']:.3f} (input masked {row['top1_agreement_excl_input']:.3f})")
        del eng
        gc.collect()
    return rows


def kv_errors(base: EngineConfig, prompts: list[list[int]], num_generate: int = 32) -> list[dict[str, Any]]:
    """Per KV dtype: relative round-trip error of real K/V, and greedy tokens matching the bf16-KV run."""
    from dataclasses import replace

    eng = Engine(replace(base, linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16))
    kvs: list[torch.Tensor] = []
    for p in prompts:
        eng.model.prefill(torch.tensor(p), lambda _layer, k, v: kvs.extend([k.float().clone(), v.float().clone()]))
    sampling = SamplingParams(max_tokens=num_generate, ignore_eos=True)
    ref_tokens = eng.generate(prompts, sampling)
    del eng
    rows = []
    for kv_dtype in KVDtype:
        num = den = 0.0
        for x in kvs:
            q, s = fp8q.quantize_kv(x, kv_dtype)
            err = fp8q.dequantize_kv(q, s, torch.float32) - x
            num += float(err.pow(2).sum())
            den += float(x.pow(2).sum())
        eng = Engine(replace(base, linear_mode=LinearMode.BF16, kv_dtype=kv_dtype))
        toks = eng.generate(prompts, sampling)
        del eng
        prefix = [_common_prefix(a, b) for a, b in zip(ref_tokens, toks, strict=True)]
        rows.append({"kv_dtype": kv_dtype.value, "kv_rel_err": (num / den) ** 0.5,
                     "greedy_tokens_matching_bf16_kv": sum(prefix) / len(prefix), "of": num_generate})
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n

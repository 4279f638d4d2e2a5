"""`bench_engine.py --engine`: the real `workers.engine.Engine` on one GPU, 8B shape, random weights.

Weights are drawn on the GPU in bf16 (`EngineConfig.init_on_device`). Each mode gets its own engine:
bf16 = bf16 linears + bf16 KV; fp8 = fp8-dynamic linears (fused per-token quantization) + fp8_e4m3 KV.
Both engines get the same KV capacity in tokens. Decode steps replay CUDA graphs (the engine's default
on CUDA with the Triton backend); one configuration is also timed eagerly to show what the graphs buy.

Prefill: `add_request` of a random prompt with max_tokens=1, then one `step()` (prefill of the whole
prompt, the KV written into the paged cache, the first token sampled); host wall time around the step
(it ends with a device→host copy of the token), median of repeats after a warm-up.

Decode: the KV cache is filled with random values written directly (not by a prefill: 64 prompts of
2K at the 8B shape would cost device time and change nothing the decode step reads); B requests with a
ctx-token prompt are placed in the running batch with that KV (positions 0..ctx-1 cached), then
`step()` is timed: one decode token per request, the whole engine step including the host-side batch
building and greedy sampling. tokens/s = B / median step time.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import torch

from orchestrator.core.types import ComputeDtype, KVDtype, LinearMode, SamplingParams
from workers.engine import Engine, EngineConfig
from workers.engine.kv_cache import blocks_for
from workers.engine.sequence import SeqState, Sequence

MODES = {
    "bf16": dict(linear_mode=LinearMode.BF16, kv_dtype=KVDtype.BF16),
    "fp8": dict(linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=KVDtype.FP8_E4M3),
}
BLOCK_SIZE = 16


def unfused_prefill_rope_kv(ops: Any) -> Any:
    """The engine's prefill before the fused op (kept to compare in the same run): torch RoPE, then the
    backend's quantize_kv of K and V and an indexed scatter into the cache."""
    from workers.engine.ops import REFERENCE_OPS, write_kv_raw

    def prefill_rope_kv(qkv, positions, inv_freq, num_heads, caches, slots, kv_dtype):  # type: ignore[no-untyped-def]
        q, k, v = REFERENCE_OPS.prefill_rope_kv(qkv, positions, inv_freq, num_heads, None, None, kv_dtype)
        if caches is not None:
            kq, ks = ops.quantize_kv(k, kv_dtype)
            vq, vs = ops.quantize_kv(v, kv_dtype)
            write_kv_raw(*caches, slots, kq, vq, ks, vs)
        return q, k, v

    return dataclasses.replace(ops, prefill_rope_kv=prefill_rope_kv)


def prefill_variants(mode: str, ops: Any) -> list[tuple[str, Any, bool]]:
    """(name, ops table, lazy rescaling in the FP8 attention) timed for prefill on the same engine: the engine
    as built; fp8 with bf16 SDPA instead of the FP8 attention; fp8 with the attention's lazy accumulator
    rescaling (off by default: measured slower); the unfused RoPE + KV write path it had before
    `prefill_rope_kv`."""
    out = [(mode, ops, False)]
    if ops.prefill_attention_fp8 is not None and mode == "fp8":
        out.append((f"{mode}-sdpa-attn", dataclasses.replace(ops, prefill_attention_fp8=None), False))
        out.append((f"{mode}-lazy-rescale", ops, True))
    if ops.backend != "reference":
        out.append((f"{mode}-unfused-rope", unfused_prefill_rope_kv(ops), False))
    return out


def _set_lazy(lazy: bool) -> bool:
    """Set the FP8 prefill attention's rescaling mode; returns the previous one."""
    try:
        from workers.kernels import prefill_attention as pa
    except ImportError:  # no triton: nothing to set
        return lazy
    old, pa.LAZY_RESCALE = pa.LAZY_RESCALE, lazy
    return old


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sync_ms(fn: Any) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3


def fill_kv_random(engine: Engine, seed: int = 0) -> None:
    """Random K/V (≈ N(0, 1) values) in every slot of every layer; FP8 scales set to a plausible 1/64."""
    g = torch.Generator(device=engine.device).manual_seed(seed)
    c = engine.cache
    with torch.inference_mode():
        for layer in range(c.k.shape[0]):
            for t in (c.k[layer], c.v[layer]):
                t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.bfloat16))
        if c.k_scale is not None and c.v_scale is not None:
            c.k_scale.fill_(1 / 64)
            c.v_scale.fill_(1 / 64)


def place_running(engine: Engine, batch: int, ctx: int, extra_tokens: int, seed: int) -> list[str]:
    """B requests with ctx cached tokens, in the running batch (white-box: the KV is already there)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    sp = SamplingParams(max_tokens=extra_tokens + 1, ignore_eos=True)
    ids = []
    for i in range(batch):
        rid = f"bench-{seed}-{i}"
        prompt = torch.randint(0, vocab, (ctx,), generator=g).tolist()
        seq = Sequence(rid, prompt, sp, SeqState.RUNNING)
        seq.blocks = engine.cache.allocator.allocate(blocks_for(ctx + extra_tokens + 1, engine.block_size))
        seq.outputs = [int(torch.randint(0, vocab, (1,), generator=g))]
        seq.num_cached = ctx
        engine._seqs[rid] = seq
        engine._running.append(rid)
        ids.append(rid)
    return ids


def time_decode(engine: Engine, batch: int, ctx: int, warmup: int, reps: int, seed: int) -> dict[str, Any]:
    ids = place_running(engine, batch, ctx, warmup + reps + 1, seed)
    try:
        for _ in range(warmup):
            assert len(engine.step()) == batch
        # intervals between consecutive step() returns, no device syncs in between: with decode lookahead
        # (workers/engine/lookahead.py) a step returns while the next one runs on the GPU, so a sync around
        # each step would measure the steps one after another instead of the steady state
        _sync()
        times = []
        t0 = time.perf_counter()
        for _ in range(reps):
            assert len(engine.step()) == batch
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e3)
            t0 = t1
        replay_ms = _replay_ms(engine, reps)
    finally:
        for rid in ids:
            engine.abort(rid)
    engine.assert_no_leaks()
    ms = statistics.median(times)
    return dict(batch=batch, ctx=ctx, step_ms=ms, tokens_per_s=batch / ms * 1e3, step_ms_min=min(times),
                step_ms_max=max(times), reps=reps, graph_replay_ms=replay_ms, lookahead=engine._lookahead)


def _replay_ms(engine: Engine, reps: int) -> float | None:
    """GPU time of the last-used decode graph alone (CUDA events around back-to-back replays): the step
    time minus this is the engine's host-side cost per step (batch building, copies, sampling, sync)."""
    g = engine._graphs
    if g is None or not g.graphs or g._table_key is None:
        return None
    _, b, w = g._table_key  # type: ignore[misc]
    graph = g.graphs[(b, w)][0]
    graph.replay()  # rewrites the KV of the last step's positions with the same values
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def time_prefill(engine: Engine, prompt_len: int, reps: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    times = []
    for r in range(reps + 1):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"prefill-{seed}-{r}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        ms = _sync_ms(lambda: engine.step())
        if r:  # the first is the warm-up
            times.append(ms)
    engine.assert_no_leaks()
    ms = statistics.median(times)
    return dict(prompt=prompt_len, prefill_ms=ms, tokens_per_s=prompt_len / ms * 1e3, reps=reps)


def profile_prefill(engine: Engine, prompt_len: int, other: dict[str, float] | None = None) -> dict[str, float]:
    """One engine prefill step under torch.profiler: GPU kernel ms by part (workers.kernels.bench_stack.PARTS),
    plus the step's wall time; wall − kernels = time the GPU waited for the host. `other` (optional) receives
    the ms of each kernel counted as "other", by name."""
    from torch.profiler import ProfilerActivity, profile

    from workers.kernels.bench_stack import PARTS

    prompt = torch.randint(0, engine.model_config.vocab_size, (prompt_len,)).tolist()
    engine.add_request("profiled", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = _sync_ms(lambda: engine.step())
    engine.assert_no_leaks()
    parts: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if not us:
            continue
        name = ev.key.lower()
        part = next((p for p, keys in PARTS if any(k.lower() in name for k in keys)), "other")
        parts[part] = parts.get(part, 0.0) + us / 1e3
        if part == "other" and other is not None:  # which kernels: by name (first 120 characters)
            other[ev.key[:120]] = other.get(ev.key[:120], 0.0) + us / 1e3
    parts["total kernels"] = sum(parts.values())
    parts["step wall (profiled)"] = wall
    return parts


def build_engine(mode: str, num_layers: int | None, capacity_tokens: int, max_batch: int, max_len: int,
                 lookahead: bool | None = None) -> Engine:
    cfg = EngineConfig(model="llama-3.1-8b-shape", num_layers=num_layers, dtype=ComputeDtype.BF16, lookahead=lookahead,
                       block_size=BLOCK_SIZE, num_blocks=blocks_for(capacity_tokens, BLOCK_SIZE),
                       max_batch_size=max_batch, max_model_len=max_len, device="cuda", init_on_device=True,
                       **MODES[mode])  # type: ignore[arg-type]
    return Engine(cfg)


def run_engine_bench(batches: list[int], contexts: list[int], prompts: list[int], num_layers: int | None,
                     capacity_tokens: int, warmup: int, reps: int, prefill_reps: int,
                     eager_point: tuple[int, int] | None, log: Any = print, profile: bool = False,
                     lookahead: bool | None = None) -> dict[str, Any]:
    extra = warmup + reps + 2
    max_len = max(max(contexts) + extra, max(prompts) + 1)
    res: dict[str, Any] = {"prefill": [], "decode": [], "skipped": [], "capacity_tokens": capacity_tokens,
                           "block_size": BLOCK_SIZE, "kv_fill": "random values written directly into the cache"}
    for mode in MODES:
        gc.collect()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        eng = build_engine(mode, num_layers, capacity_tokens, max(batches), max_len, lookahead)
        log(f"[{mode}] engine built in {time.perf_counter() - t0:.1f} s; backend={eng.ops.backend} "
            f"graphs={eng.uses_cuda_graphs} kv={eng.cache.nbytes() / 2**30:.1f} GiB "
            f"allocated={torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        res.setdefault("engines", {})[mode] = dict(backend=eng.ops.backend, cuda_graphs=eng.uses_cuda_graphs,
                                                   kv_gib=eng.cache.nbytes() / 2**30)
        ops = eng.model.ops
        for p in prompts:
            for name, v_ops, lazy in prefill_variants(mode, ops):
                eng.model.ops, lazy0 = v_ops, _set_lazy(lazy)
                try:
                    r = time_prefill(eng, p, prefill_reps, seed=p)
                finally:
                    eng.model.ops, _ = ops, _set_lazy(lazy0)
                res["prefill"].append(dict(mode=name, **r))
                log(f"[{name}] prefill {p}: {r['prefill_ms']:.1f} ms")
        if profile:
            p = max(prompts)
            for name, v_ops, lazy in prefill_variants(mode, ops):
                eng.model.ops, lazy0 = v_ops, _set_lazy(lazy)
                other: dict[str, float] = {}
                try:
                    parts = profile_prefill(eng, p, other)
                finally:
                    eng.model.ops, _ = ops, _set_lazy(lazy0)
                res.setdefault("prefill_parts", []).append(dict(mode=name, prompt=p, **parts))
                top = sorted(other.items(), key=lambda kv: -kv[1])[:8]
                res.setdefault("prefill_other_kernels", []).append(dict(mode=name, prompt=p, top_ms=top))
                log(f"[{name}] prefill {p} parts (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
                log(f"[{name}] prefill {p} 'other' kernels (ms): "
                    + "; ".join(f"{k[:60]} {v:.2f}" for k, v in top))
        fill_kv_random(eng)
        for b in batches:
            for c in contexts:
                if b * blocks_for(c + extra, BLOCK_SIZE) > eng.num_total_blocks:
                    res["skipped"].append(dict(mode=mode, batch=b, ctx=c, why="KV capacity"))
                    log(f"[{mode}] decode B={b} ctx={c}: skipped (needs more KV than {capacity_tokens} tokens)")
                    continue
                r = time_decode(eng, b, c, warmup, reps, seed=b * 100_000 + c)
                res["decode"].append(dict(mode=mode, graphs=eng.uses_cuda_graphs, **r))
                log(f"[{mode}] decode B={b} ctx={c}: {r['step_ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                    f"graph replay alone {r['graph_replay_ms'] or float('nan'):.2f} ms")
        if eager_point is not None and eng._graphs is not None:
            graphs, eng._graphs = eng._graphs, None  # the same engine, decode run eagerly for comparison
            try:
                r = time_decode(eng, *eager_point, warmup, reps, seed=7)
            finally:
                eng._graphs = graphs
                del graphs  # else the next mode's engine is built beside this one's weights and cache
            res["decode"].append(dict(mode=mode, graphs=False, **r))
            log(f"[{mode}] decode B={r['batch']} ctx={r['ctx']} EAGER: {r['step_ms']:.2f} ms/step")
        if eng._graphs is not None:
            res["engines"][mode]["graphs_captured"] = eng._graphs.num_graphs
        del eng
    return res

# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: decode lookahead under continuous batching with churn (requests finishing and joining).

Question: the steady-state bench (a fixed batch of 64) shows lookahead hiding the host time; with churn, each
join is a prefill in the same step (it waits for the launched decode) and each finish changes the batch. Does
lookahead still pay, or do the batch changes eat it? Workload: 256 requests of 512-token prompts, max_tokens
drawn uniformly from 16..256 (fixed seed), greedy, ignore_eos, at most 64 running; all added at once, then
`step()` until done. Reported: wall time, generated tokens/s, steps, per mode (fp8 / bf16) and lookahead on/off,
on the same engine (the flag is switched between runs), each setting twice, alternating.
"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
from _bench_engine_real import build_engine, fill_kv_random

from orchestrator.core.types import SamplingParams

sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import save


def run(engine, lookahead: bool, n: int = 256, prompt: int = 512, seed: int = 1) -> dict:
    engine._lookahead = lookahead
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    total = 0
    for i in range(n):
        mt = rng.randint(16, 256)
        total += mt
        engine.add_request(f"c{seed}-{i}", [rng.randrange(vocab) for _ in range(prompt)],
                           SamplingParams(max_tokens=mt, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = got = 0
    launches0 = COUNT["launch"]
    join_s = plain_s = 0.0
    joins = 0
    while engine.has_unfinished():
        waiting = engine.num_waiting_requests
        running = engine.num_running_requests
        ts = time.perf_counter()
        got += len(engine.step())
        dt = time.perf_counter() - ts
        if engine.num_waiting_requests < waiting and running:  # a step that prefilled (joins) and decoded
            join_s += dt
            joins += 1
        else:
            plain_s += dt
        steps += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    engine.assert_no_leaks()
    assert got == total
    return dict(lookahead=lookahead, requests=n, tokens=total, steps=steps, wall_s=wall, tokens_per_s=total / wall,
                launches=COUNT["launch"] - launches0, join_steps=joins, join_steps_s=join_s,
                other_steps_s=plain_s)


COUNT = {"launch": 0}


def _count_launches() -> None:
    from workers.engine.engine import Engine

    orig = Engine._forward

    def counted(self, *a, **k):  # type: ignore[no-untyped-def]
        COUNT["launch"] += 1
        return orig(self, *a, **k)

    Engine._forward = counted


def main() -> None:
    _count_launches()
    rows = []
    for mode in ("fp8", "bf16"):
        eng = build_engine(mode, None, capacity_tokens=64 * (512 + 256) + 4096, max_batch=64, max_len=1024)
        fill_kv_random(eng)
        run(eng, True, n=96, seed=0)  # warm-up: graph captures (batches up to 64), JIT
        run(eng, False, n=32, seed=0)
        for rep in range(3):
            for la in (True, False):
                r = dict(mode=mode, rep=rep, **run(eng, la))
                rows.append(r)
                print(f"{mode} lookahead={la} rep={rep}: {r['wall_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, "
                      f"{r['steps']} steps, {r['launches']} decode launches, {r['join_steps']} join steps "
                      f"{r['join_steps_s']:.2f} s, other steps {r['other_steps_s']:.2f} s", flush=True)
        del eng
        torch.cuda.empty_cache()
    save("engine_churn.json", rows)


if __name__ == "__main__":
    main()

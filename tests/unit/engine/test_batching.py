"""Acceptance 4 and 5: continuous batching gives each request its solo tokens; no block leaks."""

from __future__ import annotations

import pytest

from orchestrator.core.types import FinishReason, KVDtype, LinearMode, Rounding, SamplingParams

from .factories import greedy, make_engine, prompts, run_to_end

SEEDED = SamplingParams(max_tokens=14, temperature=1.0, top_k=40, top_p=0.9, seed=99, ignore_eos=True)


def _solo(eng, prompt, sampling):
    return eng.generate([prompt], sampling)[0]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"kv_dtype": KVDtype.FP8_E4M3, "linear_mode": LinearMode.FP8_DYNAMIC},
        {"linear_mode": LinearMode.FP8_DYNAMIC, "rounding": Rounding.STOCHASTIC},
    ],
    ids=["bf16", "fp8-kv-and-linear", "fp8-stochastic"],
)
@pytest.mark.parametrize("sampling", [greedy(14), SEEDED], ids=["greedy", "seeded"])
def test_requests_joining_and_leaving_get_their_solo_tokens(settings, sampling):
    eng = make_engine(**settings)
    ps = prompts(5)
    solo = [_solo(eng, p, sampling) for p in ps]
    # staggered arrivals, different lengths: requests join while others decode and leave at different steps
    lengths = [14, 5, 9, 14, 3]
    got: dict[str, list[int]] = {}
    finish: dict[str, FinishReason] = {}
    eng.add_request("r0", ps[0], SamplingParams(**{**sampling.__dict__, "max_tokens": lengths[0]}))
    step = 0
    while eng.has_unfinished() or step < 5:
        if 1 <= step <= 4:
            i = step
            eng.add_request(f"r{i}", ps[i], SamplingParams(**{**sampling.__dict__, "max_tokens": lengths[i]}))
        for o in eng.step():
            got.setdefault(o.request_id, []).append(o.token_id)
            if o.finish_reason is not None:
                finish[o.request_id] = o.finish_reason
        step += 1
    for i in range(5):
        assert got[f"r{i}"] == solo[i][: lengths[i]], f"request {i}"
        assert finish[f"r{i}"] is FinishReason.LENGTH
    assert eng.num_free_blocks == eng.num_total_blocks


def test_generate_batch_equals_solo_and_is_not_trivial():
    eng = make_engine()
    ps = prompts(4)
    together = eng.generate(ps, greedy(10))
    assert together == [_solo(eng, p, greedy(10)) for p in ps]
    assert len({tuple(t) for t in together}) == 4


def test_batch_size_and_block_limits_queue_requests_without_deadlock():
    eng = make_engine(max_batch_size=2, num_blocks=6, block_size=4)  # 24 tokens of KV
    ps = prompts(5, base_len=4)
    solo = [_solo(eng, p[:6], greedy(6)) for p in ps]
    for i, p in enumerate(ps):
        eng.add_request(f"q{i}", p[:6], greedy(6))  # each reserves 3 blocks: at most 2 run at once
    max_running = 0
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).append(o.token_id)
        max_running = max(max_running, eng.num_running_requests)
        assert eng.num_running_requests + eng.num_waiting_requests <= 5
        assert eng.num_free_blocks >= 0
    assert max_running == 2
    assert [out[f"q{i}"] for i in range(5)] == solo


def test_abort_frees_blocks_everywhere():
    eng = make_engine(max_batch_size=1)
    ps = prompts(3)
    for i, p in enumerate(ps):
        eng.add_request(f"a{i}", p, greedy(20))
    eng.step()  # a0 running, a1 a2 waiting
    assert eng.num_free_blocks < eng.num_total_blocks
    eng.abort("a0")
    eng.abort("a2")
    eng.abort("never-seen")  # no-op
    out = run_to_end(eng)
    assert list(out) == ["a1"] and len(out["a1"]) == 20
    # a KV reservation and an imported-but-not-started request are freed by abort as well
    src = make_engine()
    export = src.prefill_export("imp", ps[0], greedy(4))
    eng.reserve_kv("res", export.layout, 5)
    eng.import_kv(export, greedy(4))
    assert eng.num_kv_reservations == 1 and eng.num_waiting_requests == 1
    eng.abort("res")
    eng.abort("imp")
    assert eng.num_free_blocks == eng.num_total_blocks


def test_stop_tokens_eos_and_context_limit():
    eng = make_engine(max_model_len=24)
    p = prompts(1, base_len=10)[0]
    free_run = eng.generate([p], greedy(8))[0]
    stop_at = free_run[3]
    idx = free_run.index(stop_at)
    outs = []
    eng.add_request("s", p, SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.token_id for o in outs] == free_run[: idx + 1]
    assert outs[-1].finish_reason is FinishReason.STOP
    # context length: prompt 10 + generated stops at 24 total
    eng.add_request("c", p, greedy(100))
    assert len(run_to_end(eng)["c"]) == 14
    # eos stops unless ignore_eos
    eng2 = make_engine()
    first = eng2.generate([p], greedy(1))[0][0]
    eng2._eos_ids = frozenset({first})
    eng2.add_request("e", p, SamplingParams(max_tokens=5))
    assert eng2.step()[0].finish_reason is FinishReason.STOP

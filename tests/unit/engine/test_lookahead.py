"""Decode lookahead (workers/engine/lookahead.py): the same tokens as without it, no block reused while a
launched step may still write it, and the fallbacks (sampling, config). CPU; the GPU twin with CUDA graphs is
in test_cuda_graphs.py."""

from __future__ import annotations

import pytest

from orchestrator.core.types import FinishReason, SamplingParams
from workers.engine import EngineConfig

from .factories import greedy, make_engine, prompts


def _drive(engine, plan: dict[int, list[tuple[str, list[int], SamplingParams]]], aborts: dict[int, list[str]],
           steps: int = 200) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Step the engine, adding plan[step] before and aborting aborts[step] after that step; tokens and the
    finish reason per request."""
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    for step in range(steps):
        for rid, p, sp in plan.get(step, []):
            engine.add_request(rid, p, sp)
        for o in engine.step():
            toks, _ = out.setdefault(o.request_id, ([], None))
            toks.append(o.token_id)
            out[o.request_id] = (toks, o.finish_reason)
        for rid in aborts.get(step, []):
            engine.abort(rid)
        if not engine.has_unfinished() and step > max(plan):
            break
    engine.assert_no_leaks()
    return out


def _scenario(stop_token: int | None, max_model_len: int | None = None):
    ps = prompts(9, base_len=6, vocab=200)
    stop = () if stop_token is None else (stop_token,)
    plan = {
        0: [(f"a{i}", ps[i], greedy(3 + 4 * i, stop_token_ids=stop)) for i in range(3)],
        2: [("b3", ps[3], greedy(9)), ("b4", ps[4], greedy(2))],
        5: [(f"c{i}", ps[i], greedy(7, stop_token_ids=stop)) for i in range(5, 9)],  # more than the batch holds
    }
    return plan, {4: ["a2"], 6: ["c5"]}


def test_lookahead_gives_the_same_tokens_and_finishes():
    """Joins, max_tokens ends, a stop token, aborts and a queue longer than the batch: every request gets the
    same tokens and finish reason with and without lookahead, and no block leaks."""
    base = _drive(make_engine(lookahead=False, max_batch_size=4), *_scenario(None))
    # a stop token the model really emits mid-run, so some requests end unpredictably (the lookahead's wasted rows)
    stop = base["a2"][0][2]
    runs = [_drive(make_engine(lookahead=la, max_batch_size=4), *_scenario(stop)) for la in (False, True)]
    assert runs[1] == runs[0]
    reasons = {r for _, r in runs[1].values()}
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons


def test_lookahead_at_block_boundaries_and_the_context_limit():
    """Reservations that end on a block boundary (prompt + max_tokens, or max_model_len, a multiple of the block
    size): the same tokens and ends with and without lookahead."""
    kw = dict(max_model_len=32, max_batch_size=4, block_size=16)
    ps = prompts(3, base_len=10, vocab=200)  # 10, 13 and 16 tokens
    plan = {0: [("len", ps[0], greedy(6)),  # 10 + 6 = 16: one whole block
                ("ctx", ps[1], greedy(100)),  # stops at max_model_len = 32: two whole blocks
                ("other", ps[2], greedy(5))]}
    runs = [_drive(make_engine(lookahead=la, **kw), plan, {}) for la in (False, True)]
    assert runs[1] == runs[0]
    assert runs[1]["len"] == (runs[1]["len"][0], FinishReason.LENGTH) and len(runs[1]["len"][0]) == 6
    assert runs[1]["ctx"][1] is FinishReason.LENGTH and len(ps[1]) + len(runs[1]["ctx"][0]) == 32


def test_lookahead_leaves_out_a_request_that_ends_with_the_token_being_read():
    """A request certain to end (max_tokens) gets no row in the launched step: no wasted work, and its blocks
    come back at once instead of waiting for that step."""
    eng = make_engine(lookahead=True)
    ps = prompts(2, base_len=5, vocab=200)
    eng.add_request("short", ps[0], greedy(3))
    eng.add_request("long", ps[1], greedy(20))
    free_before = eng.num_free_blocks
    for _ in range(10):
        outs = {o.request_id: o for o in eng.step()}
        if "short" in outs and outs["short"].finish_reason is not None:
            break
    assert outs["short"].finish_reason is FinishReason.LENGTH
    assert eng._ahead is not None and [s.request_id for s in eng._ahead.seqs] == ["long"]
    assert free_before - eng.num_free_blocks == len(eng._seqs["long"].blocks)  # short's blocks are back
    eng.abort("long")


def test_a_launched_step_keeps_the_blocks_of_an_aborted_request_until_it_is_waited_for():
    eng = make_engine(lookahead=True)
    ps = prompts(2, base_len=5, vocab=200)
    eng.add_request("x", ps[0], greedy(20))
    eng.add_request("y", ps[1], greedy(20))
    eng.step()  # prefill
    eng.step()  # first decode: launches the next step ahead
    assert eng._ahead is not None and len(eng._ahead.seqs) == 2
    free = eng.num_free_blocks
    eng.abort("x")
    assert eng.num_free_blocks == free  # still writable by the launched step
    eng.step()  # waits for it; the blocks come back
    assert eng.num_free_blocks > free
    eng.abort("y")  # the last running request: nothing is left in flight
    assert eng._ahead is None
    eng.assert_no_leaks()


def test_sampled_requests_decode_without_lookahead():
    """A batch with a sampled request waits for any launch in flight and decodes without lookahead; greedy
    requests in it still get the tokens they get without lookahead (greedy is deterministic)."""
    ps = prompts(3, base_len=6, vocab=200)
    runs = []
    for la in (False, True):
        eng = make_engine(lookahead=la)
        eng.add_request("g0", ps[0], greedy(10))
        eng.add_request("g1", ps[1], greedy(10))
        out: dict[str, list[int]] = {}
        for step in range(40):
            if step == 3:
                eng.add_request("s", ps[2], SamplingParams(max_tokens=4, temperature=1.0, seed=7, ignore_eos=True))
            for o in eng.step():
                out.setdefault(o.request_id, []).append(o.token_id)
            if step == 5 and la:
                assert eng._ahead is None  # the sampled request is running: no lookahead
            if not eng.has_unfinished():
                break
        eng.assert_no_leaks()
        runs.append(out)
    assert runs[1] == runs[0]


def test_lookahead_defaults_and_validation():
    assert make_engine()._lookahead is False  # CPU: off unless asked (on by default with CUDA graphs)
    assert make_engine(lookahead=True)._lookahead is True
    with pytest.raises(ValueError, match="lookahead"):
        EngineConfig(lookahead="yes").validate()  # type: ignore[arg-type]

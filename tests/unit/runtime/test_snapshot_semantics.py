"""RayDispatcher's snapshot follows `WorkerSnapshot`'s definitions (the ones the simulator keeps):
prompt tokens count as queued prefill on the worker that will prefill them (the prefill worker, or the
decode worker itself for a local prefill) until the prefill ends; a request holding KV blocks counts
as `waiting` until it decodes, then in `running_batch`; completions that land together free their
capacity before the queue is pumped once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.core.types import SamplingParams
from orchestrator.runtime.api_types import GenerationRequest
from orchestrator.runtime.dispatcher import RayDispatcher
from orchestrator.runtime.fakes import FakeDeployment

ROOT = Path(__file__).resolve().parents[3]


def _config(num_kv_blocks: int = 256):
    cfg = load_config(ROOT / "cluster_configs" / "serving" / "local-cpu.yaml")  # threshold: >= 16 tokens remote
    pools = tuple(p.model_copy(update={"engine": p.engine.model_copy(update={"num_kv_blocks": num_kv_blocks})})
                  for p in cfg.pools)
    return cfg.model_copy(update={"pools": pools})


def _req(rid: str, n_prompt: int, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(rid, [1] * n_prompt, SamplingParams(max_tokens=max_tokens))


async def _settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


def _view(disp: RayDispatcher, wid: str) -> tuple[int, int, int, int]:
    w = disp.snapshot().worker(wid)
    return w.queued_prefill_tokens, w.running_batch, w.waiting, w.free_kv_blocks


async def _consume(disp: RayDispatcher, gen: GenerationRequest) -> None:
    stream = await disp.submit(gen)
    async for _ in stream:
        pass


def test_local_prefill_counts_on_the_decode_worker_until_decoding_starts():
    dep = FakeDeployment(_config(), hold=True)
    disp = RayDispatcher(dep.config, dep)
    decode = dep.impls["decode-0"]

    async def main():
        task = asyncio.ensure_future(_consume(disp, _req("a", 5, 27)))  # 32 tokens = 2 blocks, local
        await _settle()
        assert ("local", "a") in decode.calls
        assert _view(disp, "decode-0") == (5, 0, 1, 254)  # prefilling locally, holding 2 blocks
        assert _view(disp, "prefill-0")[0] == 0
        decode.start_decoding("a")
        await _settle()
        assert _view(disp, "decode-0") == (0, 1, 0, 254)
        decode.release("a")
        await task
        assert _view(disp, "decode-0") == (0, 0, 0, 256)

    asyncio.run(main())


def test_remote_prefill_counts_on_the_prefill_worker_until_it_returns():
    dep = FakeDeployment(_config(), hold=True, hold_prefill=True)
    disp = RayDispatcher(dep.config, dep)
    decode, prefill = dep.impls["decode-0"], dep.impls["prefill-0"]

    async def main():
        task = asyncio.ensure_future(_consume(disp, _req("b", 40, 8)))  # 48 tokens = 3 blocks, remote
        await _settle()
        assert prefill.calls == [("prefill", "b")]
        assert _view(disp, "prefill-0")[0] == 40
        assert _view(disp, "decode-0") == (0, 0, 1, 253)
        prefill.finish_prefill("b")
        await _settle()
        assert _view(disp, "prefill-0")[0] == 0
        assert _view(disp, "decode-0") == (0, 0, 1, 253)  # KV landed, not in the batch yet
        decode.start_decoding("b")
        await _settle()
        assert _view(disp, "decode-0") == (0, 1, 0, 253)
        decode.release("b")
        await task
        assert _view(disp, "decode-0") == (0, 0, 0, 256) and _view(disp, "prefill-0")[0] == 0

    asyncio.run(main())


def test_first_tokens_mark_a_request_decoding_without_a_decoding_frame():
    dep = FakeDeployment(_config(), hold=True)
    disp = RayDispatcher(dep.config, dep)
    seen = []

    async def main():
        stream = await disp.submit(_req("c", 5, 3))
        assert _view(disp, "decode-0")[:3] == (5, 0, 1)
        dep.impls["decode-0"].release("c")
        async for chunk in stream:  # the one frame carries tokens and the finish
            seen.append(chunk)

    asyncio.run(main())
    assert len(seen) == 1 and _view(disp, "decode-0") == (0, 0, 0, 256)
    assert disp._ledger["decode-0"].not_decoding == set()


def test_completions_landing_together_are_freed_before_one_pump():
    dep = FakeDeployment(_config(num_kv_blocks=4), hold=True)
    disp = RayDispatcher(dep.config, dep)
    decode = dep.impls["decode-0"]
    calls: list[int] = []
    route = disp.router.route

    def counting_route(req, snap):
        calls.append(snap.worker("decode-0").free_kv_blocks)
        return route(req, snap)

    disp.router.route = counting_route  # type: ignore[method-assign]

    async def main():
        a = asyncio.ensure_future(_consume(disp, _req("a", 3, 29)))  # 2 blocks each
        b = asyncio.ensure_future(_consume(disp, _req("b", 3, 29)))
        await _settle()
        c = asyncio.ensure_future(_consume(disp, _req("c", 3, 61)))  # 4 blocks: queued
        await _settle()
        assert len(disp._queue) == 1
        calls.clear()
        decode.release("a")
        decode.release("b")
        await asyncio.gather(a, b)
        await _settle()
        assert len(disp._queue) == 0
        decode.release("c")
        await c

    asyncio.run(main())
    assert calls == [4]  # one router call, after both completions freed their blocks


@pytest.mark.parametrize("hold_prefill", [False, True])
def test_cancel_clears_every_count(hold_prefill):
    dep = FakeDeployment(_config(), hold=True, hold_prefill=hold_prefill)
    disp = RayDispatcher(dep.config, dep)

    async def main():
        stream = await disp.submit(_req("x", 40, 8))
        await _settle()
        if hold_prefill:
            dep.impls["prefill-0"].finish_prefill("x")  # let the aborting prefill return
        await stream.cancel()

    asyncio.run(main())
    assert _view(disp, "decode-0") == (0, 0, 0, 256) and _view(disp, "prefill-0")[0] == 0

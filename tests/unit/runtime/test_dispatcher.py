"""RayDispatcher's decisions and bookkeeping with fake worker actors at the Ray seam (no Ray, fast):
core admission queues and refuses under KV pressure, the queue drains FIFO as blocks free, remote
prefill reserves on decode before prefill streams, cancel frees both workers, and the ledger returns
to empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.core.types import FinishReason, SamplingParams
from orchestrator.runtime.api_types import GenerationRequest, Overloaded
from orchestrator.runtime.dispatcher import RayDispatcher
from orchestrator.runtime.fakes import FakeDeployment

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def setup():
    cfg = load_config(ROOT / "cluster_configs" / "serving" / "local-cpu.yaml")
    pools = tuple(p.model_copy(update={"engine": p.engine.model_copy(update={"num_kv_blocks": 4})}) for p in cfg.pools)
    cfg = cfg.model_copy(update={"pools": pools, "admission": cfg.admission.model_copy(
        update={"max_waiting": 1, "default_queue_cap": 1})})
    dep = FakeDeployment(cfg, hold=True)
    return RayDispatcher(cfg, dep), dep.impls["decode-0"], dep.impls["prefill-0"]


def _req(rid, n_prompt=3, max_tokens=29):  # 3 + 29 = 32 tokens = 2 blocks of 16: two fit in 4 blocks
    return GenerationRequest(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


async def _collect(stream):
    return [c async for c in stream]


def test_kv_pressure_queues_then_refuses_then_drains_fifo(setup):
    disp, decode, _ = setup

    async def main():
        s1 = await disp.submit(_req("a"))
        s2 = await disp.submit(_req("b"))
        assert disp.snapshot().worker("decode-0").free_kv_blocks == 0
        queued = asyncio.ensure_future(disp.submit(_req("c")))  # no KV room: core queues it
        await asyncio.sleep(0.01)
        assert not queued.done() and len(disp._queue) == 1
        with pytest.raises(Overloaded) as ei:  # the queue cap is 1: refused with Retry-After
            await disp.submit(_req("d"))
        assert ei.value.reason == "queue_full" and ei.value.retry_after_s >= 1
        t1 = asyncio.ensure_future(_collect(s1))
        decode.release("a")
        chunks = await t1
        assert [len(c.token_ids) for c in chunks] == [29] and chunks[-1].finish_reason is FinishReason.LENGTH
        s3 = await asyncio.wait_for(queued, 1)  # "a" freed its blocks: "c" was placed
        decode.release("b")
        decode.release("c")
        await _collect(s2)
        await _collect(s3)

    asyncio.run(main())
    assert [c for c in decode.calls if c[0] == "local"] == [("local", "a"), ("local", "b"), ("local", "c")]
    adm = disp.counters.as_dict()["admissions"]
    assert adm == {"admitted": 2, "no_kv_capacity": 1, "queue_full": 1}
    snap = disp.snapshot()
    assert snap.worker("decode-0").free_kv_blocks == 4 and disp._streams == {}


def test_long_prompt_reserves_on_decode_then_prefills_remotely(setup):
    disp, decode, prefill = setup

    async def main():
        s = await disp.submit(_req("long", n_prompt=20, max_tokens=4))
        decode.release("long")
        await _collect(s)

    asyncio.run(main())
    assert decode.calls[0] == ("reserve", "long") and prefill.calls == [("prefill", "long")]
    assert disp.counters.remote_prefills == 1
    sample = [s for f in disp.metrics.kv_transfer_bytes.collect() for s in f.samples if s.name.endswith("_total")]
    assert sample[0].value == 64 * 20 and sample[0].labels["transport"] == "grpc"


def test_cancel_frees_both_workers_and_the_ledger(setup):
    disp, decode, prefill = setup

    async def main():
        s = await disp.submit(_req("x", n_prompt=20, max_tokens=4))
        it = s.__aiter__()
        nxt = asyncio.ensure_future(it.__anext__())
        await asyncio.sleep(0.01)
        await s.cancel()
        nxt.cancel()

    asyncio.run(main())
    assert ("cancel", "x") in decode.calls and ("cancel", "x") in prefill.calls
    assert decode.live == {} and disp._streams == {}
    assert disp.snapshot().worker("decode-0").free_kv_blocks == 4


def test_out_of_vocabulary_prompt_is_refused_before_dispatch(setup):
    from orchestrator.runtime.api_types import InvalidRequestError

    disp, decode, _ = setup
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        asyncio.run(disp.submit(GenerationRequest("v", [1, 999], SamplingParams(max_tokens=2))))
    assert decode.calls == []


def test_a_worker_that_stops_answering_is_unhealthy_and_requests_get_503(setup):
    from orchestrator.runtime.api_types import BackendUnavailable

    disp, decode, _ = setup

    decode.healthy = False

    async def main():
        await disp.poll_once(timeout_s=1)
        h = await disp.health()
        assert h["ok"] is False and h["healthy_workers_by_pool"] == {"decode": 0, "prefill": 1}
        with pytest.raises(BackendUnavailable):
            await disp.submit(_req("z"))

    asyncio.run(main())
    assert decode.calls == []


def test_graceful_drain_finishes_in_flight_and_refuses_new(setup):
    from orchestrator.runtime.api_types import BackendUnavailable

    disp, decode, _ = setup

    async def main():
        s = await disp.submit(_req("a"))
        consumer = asyncio.ensure_future(_collect(s))
        closing = asyncio.ensure_future(disp.drain_and_close(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(BackendUnavailable, match="shutting down"):
            await disp.submit(_req("b"))
        decode.release("a")
        chunks = await consumer
        return chunks, await closing

    chunks, cancelled = asyncio.run(main())
    assert chunks[-1].finish_reason is FinishReason.LENGTH and cancelled == 0
    assert ("cancel", "a") not in decode.calls


def test_worker_dying_mid_stream_is_a_typed_failure_and_frees_the_ledger(setup):
    from orchestrator.runtime.api_types import RequestFailed

    disp, decode, _ = setup

    async def dies(rid, wait_s):
        raise ConnectionError("actor died")

    async def main():
        s = await disp.submit(_req("a"))
        decode.drain = dies
        with pytest.raises(RequestFailed, match="actor died"):
            await _collect(s)

    asyncio.run(main())
    assert ("cancel", "a") in decode.calls and disp._streams == {}
    assert disp.snapshot().worker("decode-0").free_kv_blocks == 4

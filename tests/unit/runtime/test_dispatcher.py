"""RayDispatcher's decisions and bookkeeping with fake worker actors at the Ray seam (no Ray, fast):
core admission queues and refuses under KV pressure, the queue drains FIFO as blocks free, remote
prefill reserves on decode before prefill streams, cancel frees both workers, and the ledger returns
to empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.core.types import FinishReason, Role, SamplingParams
from orchestrator.runtime.api_types import GenerationRequest, Overloaded
from orchestrator.runtime.deployment import WorkerHandle
from orchestrator.runtime.dispatcher import RayDispatcher

ROOT = Path(__file__).resolve().parents[3]


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            out = self.fn(*args, **kwargs)
            return await out if asyncio.iscoroutine(out) else out

        return call()


class FakeActor:
    """Exposes `obj.method.remote(...)` → awaitable, like a Ray actor handle."""

    def __init__(self, impl):
        self.impl = impl

    def __getattr__(self, name):
        return _Method(getattr(self.impl, name))


class FakeDecode:
    """Each request yields its tokens only once the test opens its gate."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.live: set[str] = set()
        self.reserved: set[str] = set()

    def _gate(self, rid):
        return self.gates.setdefault(rid, asyncio.Event())

    def submit_local(self, rid, ids, sampling):
        self.calls.append(("local", rid))
        self.live.add(rid)

    def reserve(self, rid, layout, n, sampling, lease_s):
        self.calls.append(("reserve", rid))
        self.reserved.add(rid)
        self.live.add(rid)

    async def drain(self, rid, wait_s):
        if rid not in self.live:
            return {"token_ids": [], "text": "", "finish_reason": FinishReason.CANCELLED, "error": "gone"}
        try:
            await asyncio.wait_for(self._gate(rid).wait(), wait_s)
        except TimeoutError:
            return {"token_ids": [], "text": "", "finish_reason": None, "error": None}
        self.live.discard(rid)
        self.reserved.discard(rid)
        return {"token_ids": [65, 66], "text": "AB", "finish_reason": FinishReason.LENGTH, "error": None}

    def cancel(self, rid):
        self.calls.append(("cancel", rid))
        self.live.discard(rid)
        self.reserved.discard(rid)
        return True

    def telemetry(self):
        return {"healthy": True, "running": len(self.live), "waiting": 0, "free_kv_blocks": 4,
                "total_kv_blocks": 4, "power_w": None}

    def encode(self, text):
        return [1] + list(text.encode())


class FakePrefill:
    def __init__(self, decode: FakeDecode):
        self.decode = decode
        self.calls: list[tuple[str, str]] = []

    def prefill_to(self, rid, ids, sampling, address):
        assert rid in self.decode.reserved, "prefill must start only after decode reserved the KV"
        self.calls.append(("prefill", rid))
        return {"bytes": 1234, "total_ms": 5.0}

    def cancel(self, rid):
        self.calls.append(("cancel", rid))
        return False

    def telemetry(self):
        return {"healthy": True, "power_w": None}


class FakeDeployment:
    def __init__(self, config, decode, prefill):
        info = {"num_total_blocks": 4, "block_size": 16, "kv_layout": "L", "kv_address": "127.0.0.1:1",
                "max_model_len": 512, "vocab_size": 259}
        self.workers = {
            "decode-0": WorkerHandle(_Spec("decode-0"), config.pool("decode"), FakeActor(decode), info),
            "prefill-0": WorkerHandle(_Spec("prefill-0"), config.pool("prefill"), FakeActor(prefill),
                                      {**info, "num_total_blocks": 0}),
        }
        self.max_model_len = 512
        self.vocab_size = 259

    def decode_capable(self):
        return [h for h in self.workers.values() if h.role is not Role.PREFILL]


class _Spec:
    def __init__(self, wid):
        self.worker_id = wid


@pytest.fixture
def setup():
    cfg = load_config(ROOT / "cluster_configs" / "serving" / "local-cpu.yaml")
    cfg = cfg.model_copy(update={"admission": cfg.admission.model_copy(update={"max_waiting": 1,
                                                                               "default_queue_cap": 1})})
    decode = FakeDecode()
    prefill = FakePrefill(decode)
    return RayDispatcher(cfg, FakeDeployment(cfg, decode, prefill)), decode, prefill


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
        decode._gate("a").set()
        chunks = await t1
        assert [c.token_ids for c in chunks] == [[65, 66]] and chunks[-1].finish_reason is FinishReason.LENGTH
        s3 = await asyncio.wait_for(queued, 1)  # "a" freed its blocks: "c" was placed
        decode._gate("b").set()
        decode._gate("c").set()
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
        decode._gate("long").set()
        await _collect(s)

    asyncio.run(main())
    assert decode.calls[0] == ("reserve", "long") and prefill.calls == [("prefill", "long")]
    assert disp.counters.remote_prefills == 1
    sample = [s for f in disp.metrics.kv_transfer_bytes.collect() for s in f.samples if s.name.endswith("_total")]
    assert sample[0].value == 1234 and sample[0].labels["transport"] == "grpc"


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
    assert decode.live == set() and disp._streams == {}
    assert disp.snapshot().worker("decode-0").free_kv_blocks == 4


def test_out_of_vocabulary_prompt_is_refused_before_dispatch(setup):
    from orchestrator.runtime.api_types import InvalidRequestError

    disp, decode, _ = setup
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        asyncio.run(disp.submit(GenerationRequest("v", [1, 999], SamplingParams(max_tokens=2))))
    assert decode.calls == []

"""vLLM as a Tandem engine, KV over Tandem's wire: real Ray actors, real gRPC on 127.0.0.1, real vLLM.

One deployment with four pools over one locally built checkpoint (float32, bf16 KV on the wire):
`vp` / `vd` run vLLM (prefill / decode), `np` / `nd` the native engine. The tests drive the workers
the way the dispatcher does (reserve on decode, prefill_to on prefill, drain on decode):

1. vLLM prefill -> vLLM decode gives the same greedy tokens as one vLLM instance (vd prefilling locally).
2. native prefill -> vLLM decode and vLLM prefill -> native decode give the monolithic native tokens.
4. A cancelled request, a reservation whose prefill worker was killed, and a transfer to a killed
   decode worker leave no KV blocks held in vLLM or in Tandem.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.vllm.configs import pool, serving_config
from tests.vllm.conftest import needs_vllm

pytestmark = [needs_vllm, pytest.mark.ray, pytest.mark.timeout(600)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def deployment(tiny_llama, tmp_path_factory):
    import ray

    from orchestrator.runtime.deployment import Deployment
    from orchestrator.runtime.ray_local import init_local_ray

    init_local_ray(num_cpus=16)
    cfg = serving_config(tiny_llama, [pool("vp", "prefill", "vllm"), pool("vd", "decode", "vllm"),
                                      pool("np", "prefill", "native", block_size=16),
                                      pool("nd", "decode", "native", block_size=16)],
                         tmp_path_factory.mktemp("cfg") / "mixed.yaml", lease_s=4.0)
    dep = Deployment(cfg, name=f"vllm-{uuid.uuid4().hex[:6]}").start(timeout_s=300)
    yield dep
    dep.shutdown()
    ray.shutdown()


def _w(dep, wid):
    return dep.workers[wid]


def _sampling(max_tokens: int = MAX_TOKENS):
    from orchestrator.core.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _drain(actor, rid: str, timeout_s: float = 60.0) -> list[int]:
    import ray

    ids: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = ray.get(actor.drain.remote(rid, 0.5))
        assert out["error"] is None, out["error"]
        ids += out["token_ids"]
        if out["finish_reason"] is not None:
            return ids
    raise AssertionError(f"{rid} did not finish in {timeout_s}s")


def _local(dep, decode: str, prompt: list[int]) -> list[int]:
    import ray

    rid = f"local-{uuid.uuid4().hex[:8]}"
    d = _w(dep, decode)
    ray.get(d.actor.submit_local.remote(rid, prompt, _sampling()))
    return _drain(d.actor, rid)


def _disagg(dep, prefill: str, decode: str, prompt: list[int]) -> tuple[list[int], dict]:
    import ray

    rid = f"pd-{uuid.uuid4().hex[:8]}"
    p, d = _w(dep, prefill), _w(dep, decode)
    ray.get(d.actor.reserve.remote(rid, p.info["kv_layout"], len(prompt), _sampling()))
    ack = ray.get(p.actor.prefill_to.remote(rid, prompt, _sampling(), d.info["kv_address"]))
    return _drain(d.actor, rid), ack


def _prompts(dep) -> list[list[int]]:
    import ray

    enc = _w(dep, "vd-0").actor.encode
    texts = ["the prefill pool reads the prompt in one pass",
             "KV blocks travel as FP8 over gRPC between heterogeneous accelerators, routed by context length "
             "and SLA; request 7: the decode pool emits one token at a time. " * 2]
    return [ray.get(enc.remote(t)) for t in texts]


def _no_leaks(dep) -> None:
    assert dep.check_leaks() == []


def test_the_checkpoint_has_one_layout_in_both_engines(deployment):
    layouts = {wid: h.info["kv_layout"] for wid, h in deployment.workers.items()}
    assert len(set(layouts.values())) == 1, layouts
    assert deployment.workers["vd-0"].info["block_size"] == 32 and deployment.workers["nd-0"].info["block_size"] == 16


def test_vllm_prefill_to_vllm_decode_equals_one_vllm_instance(deployment):
    for prompt in _prompts(deployment):
        mono = _local(deployment, "vd-0", prompt)
        got, ack = _disagg(deployment, "vp-0", "vd-0", prompt)
        assert len(mono) == MAX_TOKENS
        assert got == mono, f"vLLM->vLLM {got} != one vLLM {mono}"
        # every layer's KV crossed the wire: 2 layers x K,V x tokens x 2 heads x 64 dims x bf16
        assert ack["bytes"] >= 2 * 2 * len(prompt) * 2 * 64 * 2
    _no_leaks(deployment)


@pytest.mark.parametrize("prefill,decode", [("np-0", "vd-0"), ("vp-0", "nd-0")], ids=["native->vllm", "vllm->native"])
def test_native_and_vllm_interoperate_both_ways(deployment, prefill, decode):
    for prompt in _prompts(deployment):
        native = _local(deployment, "nd-0", prompt)
        got, _ = _disagg(deployment, prefill, decode, prompt)
        assert got == native, f"{prefill}->{decode} {got} != monolithic native {native}"
    _no_leaks(deployment)


def test_cancelled_request_frees_vllm_blocks(deployment):
    import ray

    d = _w(deployment, "vd-0")
    prompt = _prompts(deployment)[1]
    # cancelled while decoding (vLLM holds its blocks)
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    ray.get(d.actor.submit_local.remote(rid, prompt, _sampling(400)))
    ray.get(d.actor.drain.remote(rid, 2.0))
    assert ray.get(d.actor.cancel.remote(rid))
    # cancelled after the KV arrived from native prefill (staged, then running in vLLM)
    rid2 = f"cancel-{uuid.uuid4().hex[:8]}"
    p = _w(deployment, "np-0")
    ray.get(d.actor.reserve.remote(rid2, p.info["kv_layout"], len(prompt), _sampling(400)))
    ray.get(p.actor.prefill_to.remote(rid2, prompt, _sampling(400), d.info["kv_address"]))
    ray.get(d.actor.cancel.remote(rid2))
    # cancelled while only reserved (staging, nothing in vLLM yet)
    rid3 = f"cancel-{uuid.uuid4().hex[:8]}"
    ray.get(d.actor.reserve.remote(rid3, p.info["kv_layout"], len(prompt), _sampling()))
    ray.get(d.actor.cancel.remote(rid3))
    deadline = time.monotonic() + 10
    while deployment.check_leaks() and time.monotonic() < deadline:
        time.sleep(0.2)
    _no_leaks(deployment)
    tel = ray.get(d.actor.telemetry.remote())
    assert tel["free_kv_blocks"] == tel["total_kv_blocks"]


def test_killed_prefill_worker_lease_frees_the_vllm_reservation(deployment):
    import ray

    d, p = _w(deployment, "vd-0"), _w(deployment, "vp-0")
    prompt = _prompts(deployment)[0]
    rid = f"orphan-{uuid.uuid4().hex[:8]}"
    ray.get(d.actor.reserve.remote(rid, p.info["kv_layout"], len(prompt), _sampling()))
    assert ray.get(d.actor.telemetry.remote())["reserved"] == 1
    ray.kill(p.actor)  # the prefill side dies before it streams: nobody will send this KV
    deadline = time.monotonic() + 15  # lease_s is 4
    out = {"error": None}
    while out["error"] is None and time.monotonic() < deadline:
        out = ray.get(d.actor.drain.remote(rid, 0.5))  # what the dispatcher would see
    assert out["error"] and "expired" in out["error"].lower(), out
    assert ray.get(d.actor.check_leaks.remote()) is None  # staging dropped, vLLM holds no block
    tel = ray.get(d.actor.telemetry.remote())
    assert tel["free_kv_blocks"] == tel["total_kv_blocks"] and tel["reserved"] == 0


def test_killed_vllm_decode_worker_fails_the_transfer_typed_and_prefill_holds_nothing(deployment):
    import ray

    from orchestrator.core.types import TandemError

    d, p = _w(deployment, "vd-0"), _w(deployment, "np-0")
    prompt = _prompts(deployment)[1]
    address = d.info["kv_address"]
    ray.kill(d.actor)
    with pytest.raises((TandemError, ray.exceptions.RayTaskError)) as err:
        ray.get(p.actor.prefill_to.remote(f"dead-{uuid.uuid4().hex[:8]}", prompt, _sampling(), address))
    assert isinstance(getattr(err.value, "cause", err.value), TandemError), repr(err.value)
    assert ray.get(p.actor.check_leaks.remote()) is None
    assert ray.get(_w(deployment, "nd-0").actor.check_leaks.remote()) is None


"""The worker actor classes in-process (no Ray): the real engine and the real gRPC KV transport on
127.0.0.1. Remote prefill gives the same tokens as local prefill; cancels and failed transfers free
every block on both sides."""

from __future__ import annotations

import time

import pytest

from orchestrator.core.types import KVDtype, LinearMode, Role, SamplingParams, TandemError
from workers.decode import DecodeWorker, WorkerSpec
from workers.prefill import PrefillWorker

pytestmark = pytest.mark.slow

KW = {"kv_dtype": KVDtype.FP8_E4M3, "linear_mode": LinearMode.FP8_DYNAMIC, "block_size": 16, "num_blocks": 32,
      "max_batch_size": 4, "max_model_len": 256}
TOKEN = "unit-test-token-1234"


@pytest.fixture(scope="module")
def workers():
    d = DecodeWorker(WorkerSpec("decode-0", "decode", Role.DECODE, "cpu", engine_kwargs=KW, auth_token=TOKEN))
    p = PrefillWorker(WorkerSpec("prefill-0", "prefill", Role.PREFILL, "cpu",
                                 engine_kwargs={**KW, "block_size": 8}, auth_token=TOKEN))
    yield d, p
    leaks = [d.check_leaks(), p.check_leaks()]
    d.shutdown()
    p.shutdown()
    assert leaks == [None, None]


def _drain_all(w: DecodeWorker, rid: str) -> tuple[list[int], str, object]:
    ids, text = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = w.drain(rid, 1.0)
        assert r["error"] is None, r["error"]
        ids += r["token_ids"]
        text.append(r["text"])
        if r["finish_reason"] is not None:
            return ids, "".join(text), r["finish_reason"]
    raise AssertionError("no finish within 60 s")


def test_remote_prefill_equals_local_prefill(workers):
    d, p = workers
    ids = d.encode("The receiver re-blocks KV from block size 8 into 16.")
    s = SamplingParams(max_tokens=8, ignore_eos=True)
    d.reserve("remote", d.info()["kv_layout"], len(ids), s)
    ack = p.prefill_to("remote", ids, s, d.info()["kv_address"])
    assert ack["bytes"] > 0 and ack["chunks"] >= 1
    remote = _drain_all(d, "remote")
    d.submit_local("local", ids, s)
    local = _drain_all(d, "local")
    assert remote[0] == local[0] and len(remote[0]) == 8 and remote[1] == local[1]
    assert d.telemetry()["kv_bytes_received"] >= ack["bytes"]
    assert d.check_leaks() is None


def test_cancelled_reservation_fails_the_prefill_and_frees_both(workers):
    d, p = workers
    ids = d.encode("cancel me before the KV lands")
    s = SamplingParams(max_tokens=4)
    d.reserve("gone", d.info()["kv_layout"], len(ids), s)
    assert d.telemetry()["free_kv_blocks"] < d.telemetry()["total_kv_blocks"]
    assert d.cancel("gone") is True
    with pytest.raises(TandemError):
        p.prefill_to("gone", ids, s, d.info()["kv_address"])
    assert d.check_leaks() is None and p.check_leaks() is None
    assert d.drain("gone", 0.01)["finish_reason"].value == "cancelled"


def test_cancel_while_decoding_frees_blocks(workers):
    # The tiny model decodes hundreds of tokens in well under a second, so a cancel can race the natural
    # finish: every attempt must leave nothing held, and at least one of a few must catch the request live.
    d, _ = workers
    ids = d.encode("a long generation")
    caught_live = []
    for attempt in range(5):
        rid = f"long-{attempt}"
        d.submit_local(rid, ids, SamplingParams(max_tokens=480, ignore_eos=True))
        while not d.drain(rid, 1.0)["token_ids"]:
            pass
        caught_live.append(d.cancel(rid))
        assert d.check_leaks() is None
        if caught_live[-1]:
            break
    assert any(caught_live), "cancel never found the request still decoding"


def test_reserve_beyond_capacity_is_a_typed_error(workers):
    from workers.kv_payload import KVCapacityError

    d, _ = workers
    lay = d.info()["kv_layout"]
    d.reserve("big1", lay, 200, SamplingParams(max_tokens=50))  # 250 tokens = 16 of the 32 blocks
    d.reserve("big2", lay, 200, SamplingParams(max_tokens=50))
    assert d.telemetry()["free_kv_blocks"] == 0
    with pytest.raises(KVCapacityError):
        d.reserve("big3", lay, 200, SamplingParams(max_tokens=50))
    assert d.cancel("big1") and d.cancel("big2") and not d.cancel("big3")
    assert d.check_leaks() is None


def _free_run(n: int) -> int:
    """A first port of n consecutive ports that are free right now (bound and released)."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port run found")


def test_kv_port_range_gives_each_decode_worker_its_own_ports_and_names_the_range_when_full(workers):
    """kv_transport.port_range: each decode worker's KV receiver takes the first two free consecutive ports
    of the range (gRPC, data plane); a taken port is skipped; a full range is a WorkerError naming it. A
    remote prefill through such a worker works end to end."""
    import socket

    _, p = workers
    base = _free_run(6)
    squat = socket.create_server(("127.0.0.1", base))  # someone else holds the first port
    made = []
    try:
        rng = (base, base + 5)
        for i in range(2):
            made.append(DecodeWorker(WorkerSpec(f"decode-r{i}", "decode", Role.DECODE, "cpu", engine_kwargs=KW,
                                                auth_token=TOKEN, kv_port_range=rng, kv_bind_host="127.0.0.1")))
        ports = [(w.server.port, w.server.data_port) for w in made]
        assert ports == [(base + 1, base + 2), (base + 3, base + 4)], ports
        with pytest.raises(TandemError, match=rf"port_range \[{base}, {base + 5}\]"):
            DecodeWorker(WorkerSpec("decode-r2", "decode", Role.DECODE, "cpu", engine_kwargs=KW, auth_token=TOKEN,
                                    kv_port_range=rng, kv_bind_host="127.0.0.1"))
        d = made[1]
        ids = d.encode("fixed ports")
        s = SamplingParams(max_tokens=4, ignore_eos=True)
        d.reserve("ranged", d.info()["kv_layout"], len(ids), s)
        assert d.info()["kv_address"] == f"127.0.0.1:{base + 3}"
        p.prefill_to("ranged", ids, s, d.info()["kv_address"])
        assert len(_drain_all(d, "ranged")[0]) == 4
    finally:
        squat.close()
        for w in made:
            assert w.check_leaks() is None
            w.shutdown()

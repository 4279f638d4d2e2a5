"""Acceptance 3 and 5 on the real cluster: bad input → OpenAI-style 4xx and the server stays healthy;
cancelled and disconnected streams free their KV blocks on both workers."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from .conftest import wait_no_leaks

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG = "A prompt long enough that the threshold router sends its prefill to the prefill pool, over gRPC."

BAD_COMPLETIONS = [
    ("malformed-json", b'{"model": "tiny", "prompt": "x"', 400, "invalid_json"),
    ("wrong-type-max-tokens", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "invalid_type"),
    ("wrong-type-prompt", {"model": "tiny", "prompt": {"a": 1}}, 400, "invalid_type"),
    ("wrong-type-temperature", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "invalid_type"),
    ("unknown-model", {"model": "gpt-99", "prompt": "x"}, 404, "model_not_found"),
    ("negative-max-tokens", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "invalid_value"),
    ("huge-max-tokens", {"model": "tiny", "prompt": "x", "max_tokens": 10**7}, 400, "context_length_exceeded"),
    ("prompt-over-context", {"model": "tiny", "prompt": "word " * 200, "max_tokens": 4}, 400,
     "context_length_exceeded"),
    ("token-ids-out-of-vocab", {"model": "tiny", "prompt": [1, 2, 10**6], "max_tokens": 2}, 400, None),
    ("unknown-sla-class", {"model": "tiny", "prompt": "x", "sla_class": "platinum"}, 400, "unknown_sla_class"),
]


@pytest.mark.parametrize(("body", "status", "code"), [b[1:] for b in BAD_COMPLETIONS],
                         ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_gets_openai_error(disagg, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(disagg.base_url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) > 10
    if code is not None:
        assert err["code"] == code
    assert httpx.get(disagg.base_url + "/health").status_code == 200


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "robot", "content": "x"}], "hello"],
                         ids=["empty", "no-content", "bad-role", "not-a-list"])
def test_bad_chat_gets_400(disagg, messages):
    r = httpx.post(disagg.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_server_still_serves_after_bad_input(disagg):
    c = openai.OpenAI(base_url=disagg.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    r = c.completions.create(model="tiny", prompt="still alive?", max_tokens=3)
    assert len(r.choices[0].model_extra["token_ids"]) == 3
    assert wait_no_leaks(disagg) == []


def _tokens_generated(svc) -> int:
    import ray

    hs = svc.deployment.decode_capable()
    return sum(t["tokens_generated"] for t in ray.get([h.actor.telemetry.remote() for h in hs]))


def _raw_stream(svc, body: dict) -> socket.socket:
    data = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection((svc.server.host, svc.server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


@pytest.mark.parametrize("prompt", ["Hi", LONG], ids=["local-prefill", "remote-prefill"])
def test_disconnect_mid_stream_frees_blocks_on_both_workers(disagg, prompt):
    # The tiny model decodes a few hundred tokens in well under a second on CPU, so a disconnect can
    # race the natural finish. Every attempt must leave no block held; at least one attempt must have
    # been cut short (a cancel path that never works fails every attempt). Measured: a disconnect stops
    # the request within 2-9 tokens (before the decode loop yielded its lock, cancel waited for the batch
    # to finish and 2 of 3 attempts ran all 400 tokens).
    stopped_early = []
    for _ in range(15):
        before = _tokens_generated(disagg)
        s = _raw_stream(disagg, {"model": "tiny", "prompt": prompt, "max_tokens": 400, "ignore_eos": True})
        got = b""
        while got.count(b"data: ") < 2:  # tokens arrived: the request is decoding
            got += s.recv(4096)
        s.close()
        assert wait_no_leaks(disagg, timeout_s=3) == []
        stopped_early.append(_tokens_generated(disagg) - before < 400)
        if stopped_early[-1]:
            break
    assert any(stopped_early), "no disconnect cancelled its request before it finished"


def test_disconnect_before_first_token_frees_blocks(disagg):
    # As above, the disconnect races a fast tiny model: all attempts must free everything, one must stop early.
    stopped_early = []
    for _ in range(15):
        before = _tokens_generated(disagg)
        s = _raw_stream(disagg, {"model": "tiny", "prompt": LONG * 3, "max_tokens": 200, "ignore_eos": True})
        time.sleep(0.05)  # reserved on decode and prefill running or queued, no token yet
        s.close()
        assert wait_no_leaks(disagg, timeout_s=3) == []
        stopped_early.append(_tokens_generated(disagg) - before < 200)
        if stopped_early[-1]:
            break
    assert any(stopped_early), "no early disconnect cancelled its request before it finished"


def test_openai_client_closing_stream_cancels(disagg):
    c = openai.OpenAI(base_url=disagg.base_url + "/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}],
                                       max_tokens=300, stream=True, extra_body={"ignore_eos": True})
    for n, _ in enumerate(stream, 1):
        if n == 3:
            break
    stream.close()
    assert wait_no_leaks(disagg, timeout_s=3) == []
    assert httpx.get(disagg.base_url + "/health").json()["in_flight"] == 0

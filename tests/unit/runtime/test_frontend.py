"""The HTTP frontend against a fake backend (no Ray): OpenAI shapes, errors, 429, disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from orchestrator.runtime.frontend import create_app
from orchestrator.runtime.http_server import BackgroundServer
from orchestrator.runtime.metrics import TandemMetrics
from orchestrator.runtime.openai_protocol import render_chat

from .fake_backend import FakeBackend, expected_text


@pytest.fixture(scope="module")
def served():
    backend = FakeBackend(max_in_flight=2, token_delay_s=0.0)
    metrics = TandemMetrics("tiny")
    server = BackgroundServer(create_app(backend, metrics)).start()
    yield backend, server
    server.stop()


@pytest.fixture
def client(served):
    _, server = served
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def test_completion_non_streaming(served, client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert r.choices[0].text == expected_text("hello", 5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 10
    assert r.choices[0].model_extra["token_ids"] == [ord(c) for c in expected_text("hello", 5)]


def test_completion_streaming_equals_non_streaming(client):
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text("abc", 6)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_streaming_and_not(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = render_chat_from(msgs)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    assert r.choices[0].message.content == expected_text(prompt, 4)
    assert r.choices[0].message.role == "assistant"
    s = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, stream=True))
    assert s[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in s) == expected_text(prompt, 4)


def render_chat_from(msgs):
    from orchestrator.runtime.openai_protocol import ChatMessage

    return render_chat([ChatMessage(**m) for m in msgs])


def test_chat_template_is_role_tagged():
    assert render_chat_from([{"role": "user", "content": "x"}]) == "<|user|>\nx\n<|assistant|>\n"


def test_sse_ends_with_done(served):
    _, server = served
    with httpx.stream("POST", server.base_url + "/v1/completions",
                      json={"model": "tiny", "prompt": "q", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    bodies = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies) == expected_text("q", 3)


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "12"}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "tiny", "prompt": 12}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**9}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": "y" * 200, "max_tokens": 1}).encode(), 400,
     "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": ""}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}).encode(), 400, "invalid_value"),
    (json.dumps({"prompt": "x"}).encode(), 400, "invalid_type"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD)
def test_bad_completion_input_is_a_4xx_openai_error(served, body, status, code):
    backend, server = served
    before = len(backend.submitted)
    r = httpx.post(server.base_url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}
    assert len(backend.submitted) == before  # nothing reached the backend
    assert httpx.get(server.base_url + "/health").status_code == 200


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny", "messages": "hello"},
])
def test_bad_chat_input(served, body):
    _, server = served
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[])
    assert "at least one message" in str(ei.value)


def test_overload_gives_429_with_retry_after_and_admitted_complete():
    backend = FakeBackend(max_in_flight=2, token_delay_s=0.05)
    server = BackgroundServer(create_app(backend)).start()
    try:
        import concurrent.futures as cf

        def one(i):
            return httpx.post(server.base_url + "/v1/completions",
                              json={"model": "tiny", "prompt": f"p{i}", "max_tokens": 6}, timeout=30)

        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(one, range(6)))
        ok = [r for r in rs if r.status_code == 200]
        busy = [r for r in rs if r.status_code == 429]
        assert len(ok) + len(busy) == 6 and ok and busy
        assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
        assert all(r.json()["error"]["type"] == "rate_limit_error" for r in busy)
        for r in ok:
            assert len(r.json()["choices"][0]["token_ids"]) == 6
        assert backend.live == set()
    finally:
        server.stop()


def test_disconnect_mid_stream_cancels_request():
    backend = FakeBackend(max_in_flight=4, token_delay_s=0.05, max_model_len=512)
    server = BackgroundServer(create_app(backend)).start()
    try:
        body = json.dumps({"model": "tiny", "prompt": "zz", "max_tokens": 200, "stream": True}).encode()
        req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        with socket.create_connection((server.host, server.port)) as s:
            s.sendall(req)
            got = b""
            while got.count(b"data: ") < 2:
                more = s.recv(4096)
                assert more, f"server closed the stream early: {got!r}"
                got += more
        deadline = time.monotonic() + 5
        while backend.live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.live == set()
        assert len(backend.cancelled) == 1
        assert httpx.get(server.base_url + "/health").json()["ok"] is True
    finally:
        server.stop()


def test_models_and_metrics(served):
    _, server = served
    m = httpx.get(server.base_url + "/v1/models").json()
    assert m["data"][0]["id"] == "tiny"
    r = httpx.get(server.base_url + "/metrics")
    assert r.status_code == 200 and "tandem:time_to_first_token_seconds" in r.text
    assert httpx.get(server.base_url + "/nope").json()["error"]["code"] == "not_found"


def test_failure_after_admission_is_a_500_body_or_an_sse_error_event():
    backend = FakeBackend(max_in_flight=4)
    backend.fail_after = 2
    server = BackgroundServer(create_app(backend)).start()
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
        r = httpx.post(server.base_url + "/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed"
        assert "died" in r.json()["error"]["message"]
        with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error"
        assert len(lines) == 4  # two tokens, the error, [DONE]
        assert httpx.get(server.base_url + "/health").status_code == 200
    finally:
        server.stop()

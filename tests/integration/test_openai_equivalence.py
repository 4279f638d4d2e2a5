"""Acceptance 1: over HTTP with the openai client, local-cpu.yaml (disaggregated, KV over gRPC) gives the
same greedy tokens as local-cpu-colocated.yaml: completions and chat, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHORT = "Hi there"  # < 16 tokens: local-cpu.yaml's threshold router prefills it on the decode worker
LONG = "Prefill is compute-bound and decode is memory-bound; Tandem splits them across pools."  # remote
MAX_TOKENS = 10


def _client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _completion(svc, prompt: str, stream: bool) -> tuple[list[int], str, str | None]:
    c = _client(svc)
    if not stream:
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        ch = r.choices[0]
        assert r.usage.completion_tokens == len(ch.model_extra["token_ids"])
        return ch.model_extra["token_ids"], ch.text, ch.finish_reason
    ids, text, finish = [], [], None
    for chunk in c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      stream=True):
        ch = chunk.choices[0]
        ids += ch.model_extra.get("token_ids") or []
        text.append(ch.text)
        finish = ch.finish_reason or finish
    return ids, "".join(text), finish


def _chat(svc, content: str, stream: bool) -> tuple[list[int], str, str | None]:
    c = _client(svc)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}]
    if not stream:
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
        ch = r.choices[0]
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        return ch.model_extra["token_ids"], ch.message.content, ch.finish_reason
    ids, text, finish = [], [], None
    for chunk in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == len(ids)
            continue
        ch = chunk.choices[0]
        ids += ch.model_extra.get("token_ids") or []
        text.append(ch.delta.content or "")
        finish = ch.finish_reason or finish
    return ids, "".join(text), finish


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short-local", "long-remote"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_disaggregated_equals_colocated(disagg, coloc, kind, prompt, stream):
    fn = _completion if kind == "completion" else _chat
    a = fn(disagg, prompt, stream)
    b = fn(coloc, prompt, stream)
    assert a[0], "no tokens generated"
    assert a[0] == b[0], f"disaggregated {a[0]} != colocated {b[0]}"
    assert a[1] == b[1]
    assert a[2] == b[2] and a[2] in ("stop", "length")
    if a[2] == "length":
        assert len(a[0]) == MAX_TOKENS


def test_streaming_equals_non_streaming(disagg):
    assert _completion(disagg, LONG, True)[0] == _completion(disagg, LONG, False)[0]


def test_both_prefill_paths_ran_and_kv_crossed_grpc(disagg, coloc):
    _completion(disagg, LONG, False)
    _completion(disagg, SHORT, False)
    routes = disagg.dispatcher.counters.as_dict()["routes"]
    assert routes.get("at_or_above_threshold", 0) >= 1 and routes.get("below_threshold", 0) >= 1
    assert disagg.dispatcher.counters.remote_prefills >= 1 and disagg.dispatcher.counters.local_prefills >= 1
    text = httpx.get(disagg.base_url + "/metrics").text
    kv = [ln for ln in text.splitlines() if ln.startswith("tandem:kv_transfer_bytes_total")]
    assert kv and 'transport="grpc"' in kv[0] and 'src_pool="prefill"' in kv[0]
    assert float(kv[0].split()[-1]) > 0
    assert 'tandem:route_decisions_total{model_name="tiny",reason="at_or_above_threshold"}' in text
    assert "tandem:time_to_first_token_seconds_bucket" in text
    # colocated: no KV crossed any transport
    assert "tandem:kv_transfer_bytes_total{" not in httpx.get(coloc.base_url + "/metrics").text
    assert coloc.dispatcher.counters.as_dict()["routes"].keys() == {"colocated"}


def test_models_and_health(disagg):
    models = _client(disagg).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(disagg.base_url + "/health")
    assert h.status_code == 200 and h.json()["healthy_workers_by_pool"] == {"prefill": 1, "decode": 1}

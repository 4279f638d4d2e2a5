"""A vLLM pool behind `tandem serve`: the same OpenAI API and metrics as a native pool.

Two services over the same locally built checkpoint, started like `tandem serve` does (Service:
Ray deployment + dispatcher + HTTP on 127.0.0.1): one whose prefill and decode pools run vLLM, one
whose pools run the native engine. The real `openai` client talks to both; greedy outputs, usage,
streaming, /v1/models, /health and the Prometheus families must agree. Short prompts prefill locally
on the decode worker, long ones remotely with KV over gRPC (threshold routing).
"""

from __future__ import annotations

import httpx
import pytest

from tests.vllm.configs import pool, serving_config
from tests.vllm.conftest import needs_vllm

pytestmark = [needs_vllm, pytest.mark.ray, pytest.mark.timeout(600)]
SHORT = "one token at a time"
LONG = "the prefill pool reads the prompt in one pass; KV blocks travel over gRPC between accelerators"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def services(tiny_llama, tmp_path_factory):
    import ray

    from orchestrator.runtime.ray_local import init_local_ray
    from tests.integration.conftest import start_services

    init_local_ray(num_cpus=16)
    d = tmp_path_factory.mktemp("serve")
    vllm_cfg = serving_config(tiny_llama, [pool("prefill", "prefill", "vllm"), pool("decode", "decode", "vllm")],
                              d / "vllm.yaml")
    native_cfg = serving_config(tiny_llama, [pool("prefill", "prefill", "native"),
                                             pool("decode", "decode", "native")], d / "native.yaml")
    svcs = start_services({"vllm": vllm_cfg, "native": native_cfg})
    yield svcs
    leaks = {name: s.check_leaks() for name, s in svcs.items()}
    for s in svcs.values():
        s.stop(10)
    ray.shutdown()
    assert not any(leaks.values()), f"KV leaked: {leaks}"


def _client(svc):
    import openai

    return openai.OpenAI(base_url=svc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(svc, prompt: str, stream: bool) -> tuple[list[int], str, str | None, int]:
    c = _client(svc)
    if not stream:
        r = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        ch = r.choices[0]
        return ch.model_extra["token_ids"], ch.text, ch.finish_reason, r.usage.completion_tokens
    ids, text, finish = [], [], None
    for chunk in c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      stream=True):
        ch = chunk.choices[0]
        ids += ch.model_extra.get("token_ids") or []
        text.append(ch.text)
        finish = ch.finish_reason or finish
    return ids, "".join(text), finish, len(ids)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short-local", "long-remote"])
def test_vllm_pool_answers_like_the_native_pool(services, prompt, stream):
    a = _complete(services["vllm"], prompt, stream)
    b = _complete(services["native"], prompt, stream)
    assert a[0], "no tokens"
    assert a == b, f"vLLM pool {a} != native pool {b}"


def test_chat_models_health_and_metrics_match(services):
    v, n = services["vllm"], services["native"]
    msgs = [{"role": "user", "content": "route this request by its SLA"}]
    rv = _client(v).chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    rn = _client(n).chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    assert rv.choices[0].message.content == rn.choices[0].message.content
    assert rv.usage.model_dump() == rn.usage.model_dump()
    assert [m.id for m in _client(v).models.list().data] == ["tiny-llama"]
    h = httpx.get(v.base_url + "/health")
    assert h.status_code == 200 and h.json()["healthy_workers_by_pool"] == {"prefill": 1, "decode": 1}
    _complete(v, LONG, False)
    _complete(v, SHORT, False)

    def families(svc) -> set[str]:
        text = httpx.get(svc.base_url + "/metrics").text
        return {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln.startswith("tandem:")}

    fv, fn = families(v), families(n)
    assert fv == fn, f"metric families differ: only vLLM {sorted(fv - fn)}, only native {sorted(fn - fv)}"
    text = httpx.get(v.base_url + "/metrics").text
    kv = [ln for ln in text.splitlines() if ln.startswith("tandem:kv_transfer_bytes_total")]
    assert kv and float(kv[0].split()[-1]) > 0, "no KV crossed gRPC from the vLLM prefill pool"
    assert v.dispatcher.counters.remote_prefills >= 1 and v.dispatcher.counters.local_prefills >= 1


def test_bad_input_is_a_4xx_on_the_vllm_pool(services):
    import openai

    c = _client(services["vllm"])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-llama", prompt="x " * 2000, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-llama", prompt="hi", max_tokens=4, temperature=-1)


def test_tandem_serve_cli_serves_a_vllm_pool(services, tiny_llama, tmp_path):
    """The operator's command itself: `tandem serve --config` on a vLLM-pool YAML, in its own process
    (its own private Ray on 127.0.0.1), answers like the in-process vLLM service and stops on SIGINT."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    from pathlib import Path

    serving_config(tiny_llama, [pool("prefill", "prefill", "vllm"), pool("decode", "decode", "vllm")],
                   tmp_path / "serve.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tandem = Path(sys.executable).with_name("tandem")
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([str(tandem), "serve", "--config", str(tmp_path / "serve.yaml"), "--port", str(port),
                             "--num-cpus", "4"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Tandem serving"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300), f"tandem serve did not come up: {lines[-5:]}"
        cli = type("Svc", (), {"base_url": f"http://127.0.0.1:{port}"})()
        assert _complete(cli, LONG, False) == _complete(services["vllm"], LONG, False)
        assert _complete(cli, SHORT, True) == _complete(services["vllm"], SHORT, True)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    assert code == 0 and any(ln.startswith("stopped") for ln in lines), lines[-5:]

"""Round trips over a real gRPC server on 127.0.0.1 and over the in-process fake; auth; TLS; handshake."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from orchestrator.core.types import KVDtype
from tests.wire.conftest import Recorder, push_raw
from tests.wire.fakes import TOKEN, FakeSink, G2Sink, make_layout, make_payloads, split_tokens
from tests.wire.test_fp8 import HALF_ULP_REL
from workers.kv_payload import KVLayoutMismatch
from workers.kv_transfer.client import KVTransferClient
from workers.kv_transfer.errors import TransferAuthError, TransferUnavailable, UnknownTransfer
from workers.kv_transfer.fp8 import WireDtype, dequantize, wire_dtype_of
from workers.kv_transfer.inprocess import InProcessKVTransport
from workers.kv_transfer.security import TLSConfig
from workers.kv_transfer.server import KVTransferServer
from workers.kv_transfer.wire import encode_open

NUM_TOKENS = 40
PROMPT = list(range(100, 100 + NUM_TOKENS))


def _check_values(sink: FakeSink, rid: str, payloads, tol_rel: float) -> None:
    assert sink.complete(rid)
    for p in payloads:
        ref_k = dequantize(p.k, p.k_scale)
        got_k = sink.values[rid][p.layer][0][p.token_start : p.token_start + p.num_tokens]
        amax = ref_k.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        err = ((got_k - ref_k).abs() / amax).max().item()
        assert err <= tol_rel, f"layer {p.layer}: error {err} > {tol_rel}"


CASES = [
    # (sender kv dtype, wire override, sink kind, sink kv dtype)
    (KVDtype.FP8_E4M3, None, FakeSink, KVDtype.FP8_E4M3),
    (KVDtype.BF16, None, FakeSink, KVDtype.BF16),
    (KVDtype.FP8_E4M3, None, FakeSink, KVDtype.BF16),
    (KVDtype.BF16, None, FakeSink, KVDtype.FP8_E4M3),
    (KVDtype.FP8_E5M2, None, FakeSink, KVDtype.FP8_E4M3),
    (KVDtype.FP8_E4M3, WireDtype.E4M3_G2, FakeSink, KVDtype.FP8_E4M3),
    (KVDtype.FP8_E4M3, None, G2Sink, KVDtype.FP8_E4M3),
]


@pytest.mark.parametrize(("src", "wire", "sink_cls", "dst"), CASES)
def test_grpc_round_trip_transcodes_to_the_sink(src, wire, sink_cls, dst):
    layout = make_layout()
    sink = sink_cls(layout, dst, block_size=8)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN)
    srv.start()
    try:
        with KVTransferClient(srv.address, auth_token=TOKEN) as cl:
            cl.handshake(layout)
            srv.reserve("r1", layout, NUM_TOKENS, lease_s=10)
            payloads = make_payloads(layout, src, NUM_TOKENS)
            st = cl.open_stream("r1", layout, src, PROMPT, wire_dtype=wire, chunk_bytes=1024, src_block_size=16)
            for p in payloads:
                st.send_layer(p)
            ack = st.finish(first_token_id=7)
    finally:
        srv.stop(0)
    used_wire = wire or wire_dtype_of(src)
    assert ack.num_tokens == NUM_TOKENS and ack.wire_dtype is used_wire and ack.num_chunks > layout.num_layers
    s = rec.completed["r1"]
    assert (s.prompt_token_ids, s.first_token_id, s.num_tokens, s.src_block_size) == (PROMPT, 7, NUM_TOKENS, 16)
    assert s.bytes_received == ack.bytes_received > 0 and not rec.failed
    target = getattr(sink, "kv_wire_dtype", None) or wire_dtype_of(dst)
    assert all(p.k.dtype == target.torch_dtype for p in sink.raw["r1"])
    if used_wire is target:
        tol = 0.0  # no conversion on receipt: bit-exact
    else:
        tol = HALF_ULP_REL[target] * 1.01 + (HALF_ULP_REL[used_wire] if used_wire is not wire_dtype_of(src) else 0)
    _check_values(sink, "r1", payloads, tol)
    if target is WireDtype.E4M3_G2:
        for p in sink.raw["r1"]:
            assert not bool(((p.k.view(torch.uint8) & 0x78) == 0x78).any())
    sink.release_kv("r1")
    sink.assert_no_leaks()


def test_grpc_round_trip_with_token_ranges_interleaved_across_layers(server, client, sink, rec, layout):
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, NUM_TOKENS)
    server.reserve("r2", layout, NUM_TOKENS)
    st = client.open_stream("r2", layout, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
    halves = [split_tokens(p, 17) for p in payloads]
    for h in halves:  # first halves of every layer, then the second halves (a chunked prefill)
        st.send_layer(h[0])
    for h in halves:
        st.send_layer(h[1])
    st.finish(3)
    _check_values(sink, "r2", payloads, 0.0)
    # the sink got token ranges (chunks) of each layer, each token exactly once (FakeSink checks overlap)
    assert len(sink.raw["r2"]) >= 2 * layout.num_layers
    assert any(p.token_start == 17 for p in sink.raw["r2"])


def test_in_process_transport_matches_grpc_behaviour(layout):
    sink = FakeSink(layout, KVDtype.BF16)
    rec = Recorder()
    t = InProcessKVTransport(sink, rec.on_complete, on_failure=rec.on_failure)
    t.handshake(layout)
    with pytest.raises(KVLayoutMismatch, match="num_layers: 4 here vs 3 at peer"):
        t.handshake(make_layout(num_layers=4))
    t.reserve("r", layout, NUM_TOKENS)
    assert t.health().reservations == 1
    payloads = make_payloads(layout, KVDtype.FP8_E4M3, NUM_TOKENS)
    st = t.open_stream("r", layout, KVDtype.FP8_E4M3, PROMPT, chunk_bytes=1024)
    for p in payloads:
        st.send_layer(p)
    ack = st.finish(9)
    assert ack.num_tokens == NUM_TOKENS and rec.completed["r"].first_token_id == 9
    _check_values(sink, "r", payloads, HALF_ULP_REL[WireDtype.BF16] * 1.01)
    sink.release_kv("r")
    sink.assert_no_leaks()
    assert t.health().reservations == 0


def test_handshake_names_the_mismatch(client):
    with pytest.raises(KVLayoutMismatch) as e:
        client.handshake(make_layout(num_kv_heads=8, rope_theta=500000.0))
    assert "num_kv_heads: 8 here vs 2 at peer" in str(e.value)
    assert "rope_theta: 500000.0 here vs 10000.0 at peer" in str(e.value)


def test_stream_without_reservation_is_refused(client, layout, sink):
    st = client.open_stream("nobody", layout, KVDtype.FP8_E4M3, PROMPT)
    with pytest.raises(UnknownTransfer):
        st.finish(1)
    sink.assert_no_leaks()


@pytest.mark.parametrize("token", ["", "wrong-token-xyz"])
def test_every_rpc_needs_the_token(server, sink, layout, token):
    server.reserve("r", layout, NUM_TOKENS)
    md_token = token or "placeholder"
    cl = KVTransferClient(server.address, auth_token=md_token)
    with pytest.raises(TransferAuthError):
        cl.health()
    with pytest.raises(TransferAuthError):
        cl.handshake(layout)
    with pytest.raises(TransferAuthError):
        cl.cancel("r")
    opened = encode_open("r", layout.compat_hash(1), WireDtype.E4M3FN, NUM_TOKENS, 3, 2, 16, PROMPT)
    assert isinstance(push_raw(server.address, [opened], token=token), TransferAuthError)
    cl.close()
    assert sink.reserved and "r" not in sink.released  # nothing reached the receiver
    assert server.receiver.counts() == (0, 1)
    assert server.cancel("r")  # the decode side gives up on it: every block is free again
    sink.assert_no_leaks()


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


def test_tls_round_trip_and_plaintext_refused(tmp_path, layout):
    key, cert = _self_signed(tmp_path)
    sink = FakeSink(layout)
    rec = Recorder()
    srv = KVTransferServer(sink, rec.on_complete, auth_token=TOKEN,
                           tls=TLSConfig(cert_chain_path=cert, private_key_path=key))
    srv.start()
    try:
        tls_client = KVTransferClient(srv.address, auth_token=TOKEN, tls=TLSConfig(root_ca_path=cert))
        assert tls_client.health().ok
        assert srv.data_port == 0 and tls_client.health().data_port == 0  # the plaintext data plane is off
        srv.reserve("t", layout, NUM_TOKENS)
        st = tls_client.open_stream("t", layout, KVDtype.FP8_E4M3, PROMPT)
        for p in make_payloads(layout, KVDtype.FP8_E4M3, NUM_TOKENS):
            st.send_layer(p)
        assert st.finish(1).num_tokens == NUM_TOKENS
        tls_client.close()
        plain = KVTransferClient(srv.address, auth_token=TOKEN, timeout_s=2)
        with pytest.raises(TransferUnavailable):
            plain.health()
        plain.close()
    finally:
        srv.stop(0)
    assert "t" in rec.completed

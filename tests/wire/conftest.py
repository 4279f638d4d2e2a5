"""Fixtures of the wire tests: a fake sink, a live gRPC server on 127.0.0.1, a raw frame pusher."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.core.types import KVDtype
from tests.wire.fakes import TOKEN, FakeSink, make_layout
from workers.kv_transfer.client import KVTransferClient, error_from_rpc
from workers.kv_transfer.security import SERVICE_NAME, TOKEN_METADATA_KEY
from workers.kv_transfer.server import KVTransferServer


class Recorder:
    """on_complete / on_failure callbacks that remember what they saw."""

    def __init__(self) -> None:
        self.completed: dict = {}
        self.failed: dict = {}

    def on_complete(self, rid, summary) -> None:
        assert rid not in self.completed, "on_complete fired twice"
        self.completed[rid] = summary

    def on_failure(self, rid, err) -> None:
        self.failed[rid] = err


@pytest.fixture
def layout():
    return make_layout()


@pytest.fixture
def sink(layout):
    return FakeSink(layout, KVDtype.FP8_E4M3, block_size=8)


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def server(sink, rec):
    srv = KVTransferServer(sink, rec.on_complete, on_failure=rec.on_failure, auth_token=TOKEN, default_lease_s=10)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(params=["data", "grpc"])
def client(server, request):
    """A client on each transport: the raw-TCP data plane (the default) and a gRPC PushKV stream."""
    c = KVTransferClient(server.address, auth_token=TOKEN, data_plane=request.param == "data")
    yield c
    c.close()


@pytest.fixture
def grpc_client(server):
    c = KVTransferClient(server.address, auth_token=TOKEN, data_plane=False)
    yield c
    c.close()


def push_raw(address: str, frames: list[bytes], token: str = TOKEN, timeout_s: float = 5.0):
    """Push arbitrary frames to PushKV; returns the reply bytes or the typed error (not raised)."""
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary(f"/{SERVICE_NAME}/PushKV")
        try:
            return call(iter(frames), timeout=timeout_s, metadata=((TOKEN_METADATA_KEY, token),))
        except grpc.RpcError as e:
            return error_from_rpc(e)

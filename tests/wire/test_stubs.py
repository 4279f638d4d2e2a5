"""The committed gRPC stubs are what scripts/gen_protos.py makes from proto/, and match the server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PB = ROOT / "workers" / "kv_transfer" / "_pb"


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_are_fresh(tmp_path):
    written = _load_gen().generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in PB.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == committed, f"stub files differ: generated {names}, committed {committed}"
    stale = [n for n in names if (tmp_path / n).read_text() != (PB / n).read_text()]
    assert not stale, f"stale stubs {stale}: run `.venv/bin/python scripts/gen_protos.py` and commit"


def test_proto_service_matches_the_raw_bytes_server():
    from workers.kv_transfer._pb import tandem_kv_pb2
    from workers.kv_transfer.security import SERVICE_NAME
    from workers.kv_transfer.server import METHODS

    svc = tandem_kv_pb2.DESCRIPTOR.services_by_name["KVTransfer"]
    assert svc.full_name == SERVICE_NAME
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert kinds == {"Handshake": (False, False), "PushKV": (True, False), "Cancel": (False, False),
                     "Health": (False, False)}
    assert set(kinds) == set(METHODS)

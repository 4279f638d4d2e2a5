"""KV-cache transfer between engines: wire format, gRPC server/client, in-process fake.

Read workers/kv_transfer/README.md first. Public names are re-exported here; heavy modules
(grpc) are imported lazily so that `import workers.kv_transfer` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KVTransferServer": "workers.kv_transfer.server",
    "KVTransferClient": "workers.kv_transfer.client",
    "InProcessKVTransport": "workers.kv_transfer.inprocess",
    "TransferSummary": "workers.kv_transfer.receiver",
    "KVReceiver": "workers.kv_transfer.receiver",
    "TransferAck": "workers.kv_transfer.control",
    "TLSConfig": "workers.kv_transfer.security",
    "token_from_env": "workers.kv_transfer.security",
    "WireDtype": "workers.kv_transfer.fp8",
    "PROTOCOL_VERSION": "workers.kv_transfer.wire",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'workers.kv_transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = sorted(_LAZY)

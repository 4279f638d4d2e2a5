"""The in-process meeting point of a `VLLMEngine` and the connector instances vLLM builds for it.

vLLM constructs its KV connector itself (once with the scheduler role, once with the worker role)
from `kv_transfer_config`; the connector finds the adapter's state through the hub id carried in
`kv_connector_extra_config["tandem_hub"]`. This works because the adapter runs vLLM's engine core
in its own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); a connector built in another process finds
no hub and raises `HubMissing` at construction instead of silently dropping KV.

Jobs:
- `ExportJob` (prefill side): the connector gathers each layer's KV of the request's prompt from
  vLLM's paged cache as the forward computes it and hands it to `on_layer` (Tandem's KV stream).
  An exception from `on_layer` is recorded, never raised into vLLM's forward; the adapter aborts
  the request and re-raises it.
- `ImportJob` (decode side): Tandem's transport writes the prompt's KV layer by layer into staging
  tensors (in vLLM's storage dtype, token-major); when vLLM schedules the request, the connector
  scatters them into the blocks vLLM allocated, then drops the staging.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.core.types import TandemError
from workers.kv_payload import KVLayerPayload
from workers.vllm_engine.layout import VLLMPagedLayout


class HubMissing(TandemError):
    """A Tandem connector was built where no VLLMEngine registered its hub (another process?)."""


@dataclass
class ExportJob:
    num_prompt_tokens: int
    on_layer: Callable[[KVLayerPayload], None] | None
    layers: list[KVLayerPayload] = field(default_factory=list)  # kept only when on_layer is None
    error: BaseException | None = None
    tokens_sent: dict[int, int] = field(default_factory=dict)  # layer -> tokens handed over


@dataclass
class ImportJob:
    num_tokens: int
    k: torch.Tensor  # [num_layers, num_tokens, num_kv_heads, head_dim], vLLM's storage dtype
    v: torch.Tensor
    written: torch.Tensor  # [num_layers, num_tokens] bool
    max_new_tokens: int = 0

    @property
    def complete(self) -> bool:
        return bool(self.written.all())


class Hub:
    """Shared state of one engine; every access holds `lock`."""

    def __init__(self, hub_id: str) -> None:
        self.hub_id = hub_id
        self.lock = threading.RLock()
        self.exports: dict[str, ExportJob] = {}
        self.imports: dict[str, ImportJob] = {}
        self.layout: VLLMPagedLayout | None = None  # set by the worker connector
        self.kv_scales: dict[int, tuple[float, float]] = {}  # layer -> (k_scale, v_scale)
        self.storage_dtype: torch.dtype | None = None
        self.loads_done = 0
        self.layers_exported = 0

    def is_idle(self) -> bool:
        with self.lock:
            return not self.exports and not self.imports


_HUBS: dict[str, Hub] = {}
_HUBS_LOCK = threading.Lock()


def new_hub() -> Hub:
    hub = Hub(uuid.uuid4().hex)
    with _HUBS_LOCK:
        _HUBS[hub.hub_id] = hub
    return hub


def get_hub(extra_config: dict[str, Any]) -> Hub:
    hub_id = extra_config.get("tandem_hub")
    with _HUBS_LOCK:
        hub = _HUBS.get(str(hub_id))
    if hub is None:
        raise HubMissing(f"no Tandem VLLMEngine hub {hub_id!r} in this process: the Tandem connector only works "
                         "with vLLM's engine core in the adapter's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return hub


def drop_hub(hub: Hub) -> None:
    with _HUBS_LOCK:
        _HUBS.pop(hub.hub_id, None)

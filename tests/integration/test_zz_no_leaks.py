"""Acceptance 5: after every other integration test (normal, cancelled, disconnected and failed
requests), no KV block is held on any worker of either deployment and nothing is tracked.
(Named test_zz_* so that it runs after the other modules of this directory.)"""

from __future__ import annotations

import pytest

from .conftest import wait_no_leaks

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_no_kv_blocks_leaked_on_any_worker(services):
    for name, svc in services.items():
        assert wait_no_leaks(svc, timeout_s=5) == [], name
        assert svc.dispatcher._streams == {} and len(svc.dispatcher._queue) == 0
        snap = svc.dispatcher.snapshot()
        for w in snap.workers:
            assert w.free_kv_blocks == w.total_kv_blocks and w.queued_prefill_tokens == 0, w

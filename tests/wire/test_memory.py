"""glibc allocator tuning used by the KV transfer server and client."""

from __future__ import annotations

import platform

import pytest

from workers.kv_transfer.memory import tune_malloc_for_streaming


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuning_applies_on_glibc_and_is_idempotent():
    assert tune_malloc_for_streaming() is True
    assert tune_malloc_for_streaming() is True
    # the frames this tuning serves still allocate and free normally
    for _ in range(8):
        frame = bytes(3 * 1024 * 1024)
        assert len(frame) == 3 * 1024 * 1024
        del frame


@pytest.mark.parametrize(("mmap_b", "trim_b"), [(0, 1 << 20), (1 << 20, -1)])
def test_tuning_rejects_non_positive_thresholds(mmap_b, trim_b):
    with pytest.raises(ValueError, match="positive"):
        tune_malloc_for_streaming(mmap_b, trim_b)

"""Engine tests: every engine made through `factories.make_engine` must end a test with no leaks.

Tiny-model tensors are so small that torch's intra-op threads only add contention on a busy 2-core
machine (measured: 10-20x slower with 2 threads under load), so engine tests run torch on one thread
and restore the setting afterwards.
"""

import pytest
import torch

from . import factories


@pytest.fixture(autouse=True)
def _one_thread_and_no_engine_leaks():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    factories.CREATED.clear()
    try:
        yield
        for engine in factories.CREATED:
            engine.assert_no_leaks()
    finally:
        factories.CREATED.clear()
        torch.set_num_threads(threads)

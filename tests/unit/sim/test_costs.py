"""The simulator's O(1) decode-step path returns exactly what the core's cost model returns."""

from __future__ import annotations

import random

import pytest

from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import HardwareCatalog
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import KVDtype, LinearMode
from orchestrator.sim.costs import SimCosts


@pytest.fixture(scope="module")
def catalog():
    return HardwareCatalog.load_default()


@pytest.mark.parametrize("shape", ["llama-3.1-8b-shape", "llama-3.1-70b-shape"])
def test_decode_step_from_totals_is_bit_identical(catalog, shape):
    cm = CostModel(PRESETS[shape], catalog)
    costs = SimCosts(cm)
    rng = random.Random(0)
    checked = 0
    for hw in catalog:
        for mode in LinearMode:
            for kv in KVDtype:
                for _ in range(8):
                    b = rng.choice([1, 2, 7, 64, 255])
                    lens = [rng.randint(0, 20000) for _ in range(b)]
                    want = cm.decode_step_time_s(hw, lens, linear_mode=mode, kv_dtype=kv)
                    got = costs.decode_step_time_totals_s(hw, b, sum(lens), linear_mode=mode, kv_dtype=kv)
                    assert got == want, (hw, mode, kv, b)
                    checked += 1
    assert checked == len(catalog) * len(LinearMode) * len(KVDtype) * 8


def test_memoised_calls_return_the_models_answer(catalog):
    cm = CostModel(PRESETS["llama-3.1-8b-shape"], catalog)
    costs = SimCosts(cm)
    link = catalog.link("loopback-grpc")
    for n in (1, 500, 500, 8000):
        assert costs.prefill_batch_time_s("h100-sxm", [n], linear_mode=LinearMode.BF16) == \
            cm.prefill_batch_time_s("h100-sxm", [n], linear_mode=LinearMode.BF16)
        assert costs.exposed_transfer_time_s("h100-sxm", n, KVDtype.BF16, link, linear_mode=LinearMode.BF16) == \
            cm.exposed_transfer_time_s("h100-sxm", n, KVDtype.BF16, link, linear_mode=LinearMode.BF16)
    assert costs.prefill_batch_time_s("l4", [3, 4], linear_mode=LinearMode.FP8_DYNAMIC) == \
        cm.prefill_batch_time_s("l4", [3, 4], linear_mode=LinearMode.FP8_DYNAMIC)

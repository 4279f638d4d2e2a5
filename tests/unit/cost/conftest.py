"""Fixtures of the cost-model tests: the shipped catalog and cost models of the 8B shape."""

from __future__ import annotations

import pytest

from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import HardwareCatalog
from orchestrator.core.model_shape import PRESETS


@pytest.fixture(scope="session")
def catalog() -> HardwareCatalog:
    return HardwareCatalog.load_default()


@pytest.fixture(scope="session")
def cost8b(catalog: HardwareCatalog) -> CostModel:
    return CostModel(PRESETS["llama-3.1-8b-shape"], catalog)

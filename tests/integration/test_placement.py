"""Workers are placed by their pool's Ray resources: on a local Ray whose node declares no
`prefill_node`/`decode_node` resource, a spec that asks for them cannot place its actors, and
`Deployment.start` fails with a typed error naming the deployment (nothing is left running)."""

from __future__ import annotations

import pytest

from .conftest import SERVING

pytestmark = [pytest.mark.ray]


def test_pool_resources_constrain_placement(ray_session):
    from orchestrator.config import load_config
    from orchestrator.runtime.deployment import Deployment, DeploymentError

    cfg = load_config(SERVING / "local-cpu.yaml")
    pools = tuple(p.model_copy(update={"placement": p.placement.model_copy(
        update={"resources": {f"{p.role.value}_node": 1}})}) for p in cfg.pools)
    dep = Deployment(cfg.model_copy(update={"pools": pools}), name="unplaceable")
    with pytest.raises(DeploymentError, match="unplaceable"):
        dep.start(timeout_s=3)
    assert dep.workers == {}
    names = {a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)
             if isinstance(a, dict)} if hasattr(ray_session.util, "list_named_actors") else set()
    assert not any(n.startswith("unplaceable:") for n in names)

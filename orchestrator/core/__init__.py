"""Pure-Python core: types, lifecycle, ports, cost model, power, admission, router.

Imports only the standard library, pyyaml (the hardware catalog) and `orchestrator.config`; never
torch, ray or grpc (tests/unit/test_import_boundaries.py enforces it). README.md gives the reading
path and the router's whole policy as one formula per policy.
"""

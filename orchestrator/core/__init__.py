"""Pure-Python core: types, lifecycle, ports, cost model, power, admission, router.

Imports only the standard library and `orchestrator.config`; never torch, ray or grpc
(tests/unit/test_import_boundaries.py enforces it).
"""

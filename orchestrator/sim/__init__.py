"""The simulated driver of the core: event loop, simulated fleet, workloads, reports, planner.

Pure Python (no torch, ray or grpc; rich and matplotlib only inside the functions that draw).
Start with `README.md` in this folder; the entry point is `build.build_simulation(config)`.
"""

"""Tandem data plane: engine, kernels, KV transfer, and the Ray actor classes of each pool."""

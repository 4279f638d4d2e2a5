"""Tandem control plane: config, core (pure policy), runtime (Ray), sim (simulated cluster), cli."""

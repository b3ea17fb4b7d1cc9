"""Orchestration of (k, lambda, layer subset) sweeps."""

"""Scoring of the in-domain math and out-of-domain benchmarks."""

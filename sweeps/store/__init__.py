"""Sweep state: the sweep directory and its trial records, MLflow bookkeeping, and the Optuna storage."""

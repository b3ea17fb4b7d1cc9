"""The environment the driver hands the trials' Ray workers (``runtime_env.env_vars``, on every node): the
variables they need, listed by name, and nothing else of the driver's environment."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def ray_init(monkeypatch):
    """``init_ray`` without a cluster: the keyword arguments it would hand ``ray.init``."""
    import ray

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    return seen


def test_only_the_listed_variables_reach_the_workers(monkeypatch, ray_init):
    from rpsft.sweeps.ray_session import WORKER_ENV, init_ray

    for name in WORKER_ENV:
        monkeypatch.setenv(name, f"value of {name}")
    for name in ("RPSFT_SOMETHING", "RPSFT_INJECT_COMMAND", "HF_SOMETHING", "MLFLOW_TRACKING_SOMETHING",
                 "TOKENIZERS_SOMETHING", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.setenv(name, "not for the workers")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    init_ray(None)
    assert ray_init["address"] == "local"
    assert ray_init["runtime_env"]["env_vars"] == {name: f"value of {name}" for name in WORKER_ENV}


def test_a_listed_variable_the_driver_lacks_is_not_set(monkeypatch, ray_init):
    from rpsft.sweeps.ray_session import WORKER_ENV, init_ray

    for name in WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RPSFT_CACHE_DIR", "/cache")
    init_ray("ray-head:6379")
    assert ray_init["runtime_env"]["env_vars"] == {"RPSFT_CACHE_DIR": "/cache"}


def test_pythonpath_reaches_the_workers_only_for_a_sweep_with_hooks(monkeypatch, ray_init):
    from rpsft.sweeps.ray_session import WORKER_ENV, init_ray

    for name in WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/hooks/live/here")
    init_ray(None, hooks=True)
    assert ray_init["runtime_env"]["env_vars"] == {"PYTHONPATH": "/hooks/live/here"}
    init_ray(None, hooks=False)
    assert ray_init["runtime_env"]["env_vars"] == {}

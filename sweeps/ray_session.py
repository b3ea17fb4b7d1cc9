"""The driver's Ray session: connect to a cluster (or start a local one) with the environment the trials' workers
need (:data:`WORKER_ENV`), and nothing else of the driver's."""

from __future__ import annotations

import logging
import os
from typing import Any


class _DropTokenAuthBanner(logging.Filter):
    """Ray's notice that it turned token authentication on (as it does for a new local instance): the local
    default keeps the authentication and drops the notice; every other Ray message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_auth_banner() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthBanner) for f in logger.filters):
        logger.addFilter(_DropTokenAuthBanner())


# The driver's environment variables the trials' Ray workers need (on every node), and no others
WORKER_ENV = (
    "RPSFT_CACHE_DIR",  # rpsft.core.models.default_cache_dir: the dequantized models, the evaluation caches
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_TOKEN",  # a gated model or dataset on the hub
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",  # a tracking server with basic auth
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


def worker_env(hooks: bool = False) -> dict[str, str]:
    """The variables of :data:`WORKER_ENV` the driver has set; with ``hooks``, also its ``PYTHONPATH``, so the
    workers import the sweep's trial hooks (:mod:`rpsft.sweeps.trial.hooks`) from where the driver did."""
    names = (*WORKER_ENV, "PYTHONPATH") if hooks else WORKER_ENV
    return {name: os.environ[name] for name in names if name in os.environ}


def init_ray(address: str | None, hooks: bool = False) -> dict[str, float]:
    """Connect to the Ray cluster at ``address`` (``None``: a new local instance) with the trials' environment
    (:func:`worker_env`); its resources."""
    import ray

    env = worker_env(hooks)
    if not ray.is_initialized():
        _quiet_token_auth_banner()
        kwargs: dict[str, Any] = dict(
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": env},
            configure_logging=False,
        )
        # without an address: a new local instance, never another driver's cluster on this machine
        ray.init(address=address or "local", **kwargs)
    return dict(ray.cluster_resources())

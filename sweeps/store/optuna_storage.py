"""The Optuna storage of a sweep, made to outlive a restart of its database.

Optuna's ``RDBStorage`` keeps pooled connections: after the database restarts, each of them fails once
("terminating connection due to administrator command"), and while it is down every call fails. The driver
would die with the study half told. :class:`ReconnectingRDBStorage` checks connections before use
(SQLAlchemy's ``pool_pre_ping``) and retries a storage call that failed on a lost or refused connection, with
backoff, for up to ``retry_seconds``; any other error is raised at once.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage

log = logging.getLogger(__name__)

RETRY_SECONDS = 300.0  # how long a storage call waits out a database outage before it fails
_FIRST_DELAY, _MAX_DELAY = 0.5, 5.0


def _lost_connection(exc: BaseException) -> bool:
    """A failure of the connection itself (down, restarted, refused), not of the statement."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
    return False


def _retrying(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay = _FIRST_DELAY
        while True:
            try:
                return method(self, *args, **kwargs)
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
                if not _lost_connection(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "optuna storage: %s lost its connection; retrying in %.1f s", method.__name__, delay
                )
                time.sleep(delay)
                delay = min(2 * delay, _MAX_DELAY)

    return call


class ReconnectingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls wait out a database restart (see the module docstring)."""

    retry_seconds: float = RETRY_SECONDS

    def __init__(self, url: str, engine_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # opening is not retried: an unreachable database at the start is bad input, reported at once
        super().__init__(url, engine_kwargs={"pool_pre_ping": True, **(engine_kwargs or {})}, **kwargs)


# the private calls Optuna's own ``_CachedStorage`` (the wrapper every study puts around an RDBStorage) makes
_CACHE_CALLS = (
    "_create_new_trial",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
    "_get_trials",
    "_set_trial_param",
)


def _storage_calls() -> list[str]:
    """Every call into the database: BaseStorage's and RDBStorage's public methods and ``_CACHE_CALLS``."""
    names = {
        name for name, member in vars(BaseStorage).items() if callable(member) and not name.startswith("_")
    }
    names |= {
        name for name, member in vars(RDBStorage).items() if callable(member) and not name.startswith("_")
    }
    names |= set(_CACHE_CALLS)
    return sorted(n for n in names if not isinstance(vars(RDBStorage).get(n), (staticmethod, classmethod)))


for _name in _storage_calls():
    setattr(ReconnectingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))


def optuna_storage(url: str) -> Any:
    """An Optuna storage for ``sqlite:``/``postgresql:``/... URLs or ``journal:<file>``."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:"):
        Path(url.split(":///", 1)[-1]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url)  # a local file: nothing to reconnect to
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgresql") else {}
    return ReconnectingRDBStorage(url, engine_kwargs=engine_kwargs)

"""What a sweep's driver holds and what it leaves when refused: the per-sweep driver lock, and the removal of
whatever a refused run created."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.store.sweep_store import SweepStore


@contextlib.contextmanager
def driver_lock(store: SweepStore):
    """Hold ``<sweep dir>/driver.lock`` for the life of a driver: a second driver on the same sweep (a second
    `rpsft sweep`, a `resume` while it runs) is refused. The operating system drops the lock when the process
    dies, so a killed driver never leaves it stale."""
    import datetime
    import fcntl
    import socket

    name = store.name
    store.dir.mkdir(parents=True, exist_ok=True)
    handle = open(store.lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SweepConfigError(
            f"name: sweep {name!r} is being run by another driver ({holder}). Fix: wait for it to finish, or stop "
            f"it and run `rpsft sweep resume {name}`, or give this sweep another name (--name)"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        since = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def local_storage_file(url: str) -> Path | None:
    """The file behind a local storage URL (``sqlite:///<file>``, ``journal:<file>``); ``None`` for a server."""
    if url.startswith("sqlite:"):
        return Path(url.split(":///", 1)[-1]).expanduser()
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:")).expanduser()
    return None


SIDECARS = ("-journal", "-wal", "-shm", ".lock")  # a storage file's companions, kept or removed with it
SQLITE_HEADER = b"SQLite format 3\x00"
RECORD_TABLES = ("runs", "studies")  # MLflow's runs, Optuna's studies


def holds_records(path: Path) -> bool:
    """Whether a storage file holds some sweep's records: a SQLite database with a row in MLflow's ``runs`` or
    Optuna's ``studies``, or a non-empty file of another kind (an Optuna journal). Unreadable: ``True``."""
    import sqlite3

    if not path.is_file() or path.name.endswith(SIDECARS):
        return False
    try:
        with path.open("rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return path.stat().st_size > 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return any(
                db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
                for table in RECORD_TABLES
                if table in tables
            )
    except (OSError, sqlite3.Error):
        return True


@dataclass(frozen=True)
class NotYetThere:
    """What a sweep run may create and did not exist when it started: its folder, its storage files (a SQLite
    database with its journal, an Optuna journal with its lock) and the folders above them."""

    sweep_dir: Path | None
    files: tuple[Path, ...]
    folders: tuple[Path, ...]

    @classmethod
    def now(cls, store: SweepStore, storage_files: list[Path]) -> NotYetThere:
        ends = ("", *SIDECARS)
        files = tuple(
            p for f in storage_files for p in (f.with_name(f.name + e) for e in ends) if not p.exists()
        )
        folders = {folder for path in (store.dir, *files) for folder in path.parents if not folder.exists()}
        return cls(
            None if store.dir.exists() else store.dir,
            files,
            tuple(sorted(folders, key=lambda f: len(f.parts), reverse=True)),  # the deepest first
        )

    def remove(self) -> None:
        """Remove what this run created: the sweep's folder, the storage files, the folders once empty. A
        storage file that another sweep has written to meanwhile (MLflow runs, Optuna studies, journal entries)
        stays, with its SQLite journals."""
        if self.sweep_dir is not None:
            shutil.rmtree(self.sweep_dir, ignore_errors=True)
        kept = [path for path in self.files if holds_records(path)]
        for path in self.files:
            if not any(path.parent == k.parent and path.name.startswith(k.name) for k in kept):
                path.unlink(missing_ok=True)
        for folder in self.folders:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()


@contextlib.contextmanager
def nothing_left_when_refused(store: SweepStore, created: NotYetThere):
    """A sweep refused for bad input (an :class:`~rpsft.core.errors.InputError` before it has a state file)
    leaves nothing behind: what ``created`` lists (taken before the driver lock made the sweep's folder) is
    removed. Whatever existed before the run stays. Enter it holding the driver lock, so that a driver refused
    for the lock never removes the folder of the driver that holds it."""
    from rpsft.core.errors import InputError

    try:
        yield
    except InputError:
        if not store.exists():
            created.remove()
        raise

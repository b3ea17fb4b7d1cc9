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


@dataclass(frozen=True)
class NotYetThere:
    """What a sweep run may create and did not exist when it started: its folder, its storage files (a SQLite
    database with its journal, an Optuna journal with its lock) and the folders above them."""

    sweep_dir: Path | None
    files: tuple[Path, ...]
    folders: tuple[Path, ...]

    @classmethod
    def now(cls, store: SweepStore, storage_files: list[Path]) -> NotYetThere:
        ends = ("", "-journal", "-wal", "-shm", ".lock")
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
        """Remove what this run created: the sweep's folder, the storage files, the folders once empty."""
        if self.sweep_dir is not None:
            shutil.rmtree(self.sweep_dir, ignore_errors=True)
        for path in self.files:
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

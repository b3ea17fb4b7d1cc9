"""JSON cache files that check themselves: each holds its value and the sha256 of the value's canonical JSON.

A file that is missing, truncated, unparsable or whose content no longer matches its hash reads as absent, so
the caller recomputes it; it is never used. Writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = "rpsft-json-cache-v1"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_cached_json(path: str | os.PathLike, value: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "sha256": _digest(value), "value": value}))
    tmp.replace(path)


def read_cached_json(path: str | os.PathLike) -> Any | None:
    """The cached value, or None when the file is missing or fails its check."""
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or "value" not in stored:
        return None
    return stored["value"] if stored.get("sha256") == _digest(stored["value"]) else None


def cached_json(path: str | os.PathLike, compute: Callable[[], Any]) -> Any:
    """The value stored at ``path`` if it passes its check, else ``compute()`` (then stored)."""
    value = read_cached_json(path)
    if value is None:
        value = compute()
        write_cached_json(path, value)
    return value

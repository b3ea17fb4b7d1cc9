"""What every section of a sweep config uses: its error, the sweep name and the non-empty list check."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator
from rpsft.core.config import ConfigError


class SweepConfigError(ConfigError):
    """A sweep that cannot run; raised before any trial starts, naming the field and the fix."""


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SWEEP_NAME_EXAMPLE = "demo-1"


def sweep_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a sweep (it names the sweep's folder under the runs dir), or ``None``."""
    if SWEEP_NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a sweep name: a sweep name names a folder, so it holds only letters, digits, '.', '_' "
        "and '-', and starts with a letter or a digit"
    )


def _check_sweep_name(name: str) -> str:
    problem = sweep_name_problem(name)
    if problem:
        raise ValueError(f"{problem}. Fix: e.g. {SWEEP_NAME_EXAMPLE}")
    return name


SweepName = Annotated[str, AfterValidator(_check_sweep_name)]


def non_empty(values: list[Any], what: str) -> list[Any]:
    if not values:
        raise ValueError(f"the list of {what} is empty. Fix: give at least one value")
    return values

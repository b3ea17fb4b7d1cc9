"""How every ``rpsft`` command reports bad input: the message in red on stderr and exit status 2.

Commands raise :class:`~rpsft.core.errors.InputError` (a config, a path, a data row the user can fix);
:class:`InputErrorGroup`, the group class of the ``rpsft`` app, is the one place that turns it into a message
and exit status 2. Any other exception is a bug or a resource failure (an out-of-memory error, a dead service)
and keeps its traceback and exit status 1.
"""

from __future__ import annotations

import warnings
from typing import Any, NoReturn

import click
import typer
from rpsft.core.errors import InputError
from typer.core import TyperGroup

BAD_INPUT_EXIT = 2


class InputErrorGroup(TyperGroup):
    """A typer group whose commands' :class:`InputError` becomes ``error: <message>`` and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=BAD_INPUT_EXIT) from None


def fail(message: str) -> NoReturn:
    """Deprecated: ``raise InputError(message)`` instead (the app's handler prints it and exits with 2)."""
    warnings.warn(
        "rpsft.core.cli_errors.fail is deprecated; raise rpsft.core.errors.InputError instead",
        DeprecationWarning,
        stacklevel=2,
    )
    raise InputError(message.removeprefix("error: "))

"""How every ``rpsft`` command reports bad input: the message in red on stderr and exit status 2.

Commands raise :class:`~rpsft.core.errors.InputError` (a config, a path, a data row the user can fix);
:class:`InputErrorGroup`, the group class of the ``rpsft`` app and its ``sweep`` group, is the one place that
turns it into a message and exit status 2. Any other exception is a bug or a resource failure (an out-of-memory
error, a dead service) and keeps its traceback and exit status 1. :func:`check_options` validates the values
given on the command line before they join a config file's, so that a bad one is reported under its option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click
import typer
from rpsft.core.cli_help import CleanHelp
from rpsft.core.errors import InputError
from typer.core import TyperGroup

if TYPE_CHECKING:
    from pydantic import BaseModel

BAD_INPUT_EXIT = 2


class InputErrorGroup(CleanHelp, TyperGroup):
    """A typer group whose commands' :class:`InputError` becomes ``error: <message>`` and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=BAD_INPUT_EXIT) from None


def check_options(model: type[BaseModel], options: Mapping[str, tuple[str, Any]], command: str) -> None:
    """Validate the command-line values alone against ``model``; ``options`` maps each of its fields to
    ``(the option that sets it, the value given or None)``. A bad value raises :class:`InputError` naming its
    option (``--samples``), not the field it sets (``k``)."""
    from pydantic import ValidationError

    given = {field: value for field, (_, value) in options.items() if value is not None}
    try:
        model.model_validate(given)
    except ValidationError as exc:
        # only the given values' own errors: the rest (fields a config file sets, checks across fields) are
        # reported when the whole config is validated
        errors = [err for err in exc.errors() if err["loc"] and str(err["loc"][0]) in given]
        if not errors:
            return
        lines = []
        for err in errors:
            field = str(err["loc"][0])
            option, value = options[field][0], given[field]
            reason = err["msg"].removeprefix("Value error, ")
            lines.append(f"{option} {value}: {reason[:1].lower()}{reason[1:]}")
        raise InputError(
            "\n".join(dict.fromkeys(lines))
            + f"\nFix: change the value(s) above (`{command} --help` lists each "
            "option's accepted values)"
        ) from None

"""How every ``rpsft`` command reports bad input: the message in red on stderr and exit status 2.

Only input errors (a config, a path, a data row the user can fix) come here; a bug or an out-of-memory error
keeps its traceback and exit status 1.
"""

from __future__ import annotations

from typing import NoReturn

import typer

BAD_INPUT_EXIT = 2


def fail(message: str) -> NoReturn:
    """Print ``message`` (it names the field and the fix) and exit with status 2."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=BAD_INPUT_EXIT)

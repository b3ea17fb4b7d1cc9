"""How every ``rpsft`` command lays out its ``--help``: arguments in upper case (``CONFIG``, ``[NAME]``) in the
usage line and the arguments panel, flags (``--help``, ``--json``, ``--tag/--no-tag``) without a value type, and
the docstring's paragraphs reflowed to the terminal's width (the first one, a short sentence, is the command's
line in its group's list).

:class:`CleanHelp` lays out the ``--help`` option, for commands and groups alike (the groups' class,
:class:`rpsft.core.cli_errors.InputErrorGroup`, uses it); :class:`RpsftCommand`, the class every ``rpsft`` command
is registered with (``app.command(cls=RpsftCommand)``), adds its arguments, flags, usage line and docstring.
"""

from __future__ import annotations

import inspect
from typing import Any

import click
from typer.core import TyperCommand


def reflowed(text: str | None) -> str | None:
    """``text`` (a docstring) with each paragraph on one line: the terminal, not the source, breaks its lines."""
    if not text:
        return text
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _clean(param: click.Parameter) -> click.Parameter:
    """An argument named in upper case; a flag (it takes no value) without a value type next to it."""
    if param.metavar is None:
        if param.param_type_name == "argument":
            param.metavar = (param.name or "").upper()
        elif getattr(param, "is_flag", False):
            param.metavar = ""
    return param


class CleanHelp:
    """The ``--help`` layout of an ``rpsft`` command or group (a mixin before typer's class): its ``--help``
    option, created on first use, shown as the flag it is."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        return None if option is None else _clean(option)


class RpsftCommand(CleanHelp, TyperCommand):
    """An ``rpsft`` command: typer's, with the ``--help`` layout of :class:`CleanHelp`."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, help=reflowed(help), **kwargs)
        for param in self.params:
            _clean(param)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """``[OPTIONS] CONFIG [NAME]``: a required argument bare, an optional one in brackets."""
        pieces = [self.options_metavar] if self.options_metavar else []  # type: ignore[attr-defined]
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar or (param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

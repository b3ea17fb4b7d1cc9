"""The old spellings of ``rpsft`` commands and options, kept working for one release with a notice.

:func:`legacy_spellings` makes the command class of a command that still accepts renamed options
(``--output-dir`` for ``--out``) or that is itself an old spelling of a moved command (``rpsft select`` for
``rpsft sweep select``). Each use prints one line on stderr naming the new spelling; the old names are not
shown in ``--help``.
"""

from __future__ import annotations

from collections.abc import Mapping

import click
import typer
from typer.core import TyperCommand


def notice(old: str, new: str) -> None:
    """The one-line notice for an old spelling (on stderr, so it never mixes with JSON on stdout)."""
    typer.secho(
        f"notice: {old} is deprecated and will be removed in the next release; use {new}",
        fg=typer.colors.YELLOW,
        err=True,
    )


def rename_options(args: list[str], renamed: Mapping[str, str]) -> list[str]:
    """``args`` with each old option name (``--old`` or ``--old=value``) replaced by its new name."""
    out: list[str] = []
    for position, arg in enumerate(args):
        if arg == "--":
            return out + args[position:]
        name, equals, value = arg.partition("=")
        if name in renamed:
            notice(name, renamed[name])
            arg = renamed[name] + equals + value
        out.append(arg)
    return out


def legacy_spellings(
    renamed: Mapping[str, str] | None = None, moved_to: str | None = None
) -> type[TyperCommand]:
    """A command class that accepts the ``renamed`` options (old name -> new name) and, with ``moved_to``
    (the new spelling of the whole command, e.g. ``rpsft sweep select``), announces itself as an old one."""
    renamed = dict(renamed or {})

    class LegacySpellingCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if moved_to is not None:
                notice(f"`rpsft {ctx.info_name}`", f"`{moved_to}`")
            return super().parse_args(ctx, rename_options(args, renamed))

    return LegacySpellingCommand

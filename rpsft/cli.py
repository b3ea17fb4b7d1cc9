"""The ``rpsft`` command line: each package's commands, imported and registered here, above the layers.

``rpsft train|methods|models`` (``rpsft.core``), ``rpsft eval`` and ``rpsft diagnose`` (``evaluation``),
``rpsft sweep run|resume|select`` and ``rpsft export|rl|regress`` (``sweeps``), ``rpsft sweep report`` and
``rpsft study`` (``dashboards``). The app's group, :class:`~rpsft.core.cli_errors.InputErrorGroup`, is its one
error handler: an :class:`~rpsft.core.errors.InputError` from any command is printed and exits with 2; any
other exception keeps its traceback. Each command imports its heavy dependencies when it runs, so
``rpsft --help`` stays fast.
"""

from __future__ import annotations

import typer

import rpsft.core.cli
import rpsft.dashboards.cli
import rpsft.evaluation.cli
import rpsft.evaluation.diagnostics.cli
import rpsft.sweeps.cli
from rpsft.core.cli_errors import InputErrorGroup

app = typer.Typer(
    cls=InputErrorGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Rotation-Preserving SFT: train, evaluate, sweep.",
)
sweep_app = rpsft.sweeps.cli.sweep_group()

rpsft.core.cli.register(app)
rpsft.evaluation.cli.register(app)
rpsft.evaluation.diagnostics.cli.register(app)
rpsft.sweeps.cli.register(app, sweep_app)
rpsft.dashboards.cli.register(app, sweep_app)
app.add_typer(sweep_app, name="sweep")

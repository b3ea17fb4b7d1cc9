"""``rpsft sweep run|resume|select`` and ``rpsft export``, ``rpsft rl``, ``rpsft regress``.

:func:`register` adds them to the ``rpsft`` app and its ``sweep`` group (:func:`sweep_group`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import typer
from rpsft.core.cli_errors import InputErrorGroup
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError

DEFAULT_RUNS_DIR = Path("runs/sweeps")


def runs_dir_option() -> Any:
    """``--runs-dir``, the root of the stored sweeps, the same in every command that reads one."""
    return typer.Option(
        DEFAULT_RUNS_DIR, "--runs-dir", help="The root of the stored sweeps (a sweep's output_dir)."
    )


def checked_sweep_name(param: typer.CallbackParam, value: str | None) -> str | None:
    """A sweep's name as given on the command line (the ``NAME`` argument, ``--name``, ``--from``), refused
    when it is a path or not a name; the folder that holds the sweeps is ``--runs-dir``'s."""
    if value is None:
        return None
    what = param.opts[0] if param.param_type_name == "option" else (param.name or "name").upper()
    if "/" in value or os.sep in value:
        path = Path(value)
        raise InputError(
            f"{what}: {value!r} is a path, and {what} takes a sweep's name. Fix: pass the name and the folder that "
            f"holds the sweep with --runs-dir, e.g. {path.name or 'NAME'} --runs-dir {path.parent}"
        )
    from rpsft.sweeps.config.errors import SWEEP_NAME_EXAMPLE, sweep_name_problem

    problem = sweep_name_problem(value)
    if problem:
        raise InputError(f"{what}: {problem}. Fix: e.g. {SWEEP_NAME_EXAMPLE}")
    return value


def sweep_name_argument() -> Any:
    """``NAME``, a stored sweep's name (its folder under ``--runs-dir``), the same in every command that takes one."""
    return typer.Argument(
        ..., help="The sweep's name (its folder under --runs-dir).", callback=checked_sweep_name
    )


def sweep_group() -> typer.Typer:
    """The ``rpsft sweep`` group that :func:`register` (and ``rpsft.dashboards.cli.register``) fill."""
    return typer.Typer(
        cls=InputErrorGroup,
        no_args_is_help=True,
        help="Sweeps: run one, resume it, select its operating point, report it.",
    )


def mlflow_command() -> str:
    """The ``mlflow`` executable beside this Python (``.venv/bin/mlflow`` from the checkout), as a user would
    type it from the current directory."""
    import sys

    path = Path(sys.executable).parent / "mlflow"
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
    return relative if not relative.startswith("..") else str(path)


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def shared_view_text(tracking_uri: str, experiment_id: str, sweep: str, beta: float) -> str:
    """:func:`mlflow_view_text`, after (re)storing the view, for sweeps stored before it existed."""
    from rpsft.sweeps.store import tracking

    tracking.share_trials_view(tracking.client_for(tracking_uri), experiment_id, sweep, beta)
    return mlflow_view_text(tracking_uri, experiment_id, sweep)


def mlflow_view_text(tracking_uri: str, experiment_id: str, sweep: str) -> str:
    """How to open the sweep's trials in the MLflow UI, sorted by Phi with G_id, F_ood and the knobs as columns
    (:func:`rpsft.sweeps.store.tracking.share_trials_view`): the server's own address for a tracking server,
    else the ``mlflow ui`` command over the store and the address it serves."""
    from rpsft.sweeps.store.tracking import trials_view_url

    if tracking_uri.startswith(("http://", "https://")):
        return f"\n  trials by Phi: {trials_view_url(tracking_uri, experiment_id, sweep)}"
    return (
        f"\n  browse: {mlflow_command()} ui --backend-store-uri {tracking_uri}"
        f"\n  trials by Phi: {trials_view_url(MLFLOW_UI, experiment_id, sweep)}"
    )


def _print_outcome(outcome, beta: float) -> None:
    from rpsft.sweeps.analysis.summary import selection_text, trials_table

    typer.echo("\n" + trials_table(outcome.trials, beta, outcome.selection))
    if outcome.selection:
        typer.echo("\n" + selection_text(outcome.selection))
    else:
        typer.echo("\nno finished trial carries G_id/F_ood: nothing to select")
    typer.echo(
        f"\nMLflow: {outcome.tracking_uri}  (experiment id {outcome.experiment_id}, parent run {outcome.parent_run_id})"
        + mlflow_view_text(outcome.tracking_uri, outcome.experiment_id, outcome.name)
        + f"\nsweep state: {outcome.sweep_dir}"
    )


def run(
    config: str = typer.Argument(..., help="A sweep YAML (see sweeps/configs/)."),
    name: str | None = typer.Option(
        None, "--name", help="Override the config's sweep name.", callback=checked_sweep_name
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster address ('auto' or host:port); default local."
    ),
) -> None:
    """Run a sweep over k, lambda and layers.

    Ray Tune runs the trials, Optuna proposes them, MLflow tracks them."""
    from rpsft.sweeps.config.sweep import load_sweep_config
    from rpsft.sweeps.runner import run_sweep

    outcome = run_sweep(load_sweep_config(config, {"name": name}), address=address, echo=typer.echo)
    _print_outcome(outcome, outcome.selection.beta if outcome.selection else 1.0)


def resume(
    name: str = sweep_name_argument(),
    address: str | None = typer.Option(
        None, help="Ray cluster address ('auto' or host:port); default local."
    ),
    runs_dir: Path = runs_dir_option(),
) -> None:
    """Resume a sweep after a crash or a kill.

    Finished trials are not rerun."""
    from rpsft.sweeps.runner import resume_sweep

    outcome = resume_sweep(name, root=runs_dir, address=address, echo=typer.echo)
    _print_outcome(outcome, outcome.selection.beta if outcome.selection else 1.0)


def select(
    name: str = sweep_name_argument(),
    beta: float | None = typer.Option(
        None, help="Forgetting weight of Phi = G_id - beta F_ood (default: the sweep's)."
    ),
    runs_dir: Path = runs_dir_option(),
    tag: bool = typer.Option(False, "--tag", help="Move the MLflow operating-point tag to this choice."),
    as_json: bool = typer.Option(False, "--json", help="Print the selection as JSON."),
) -> None:
    """Select a sweep's operating point.

    The max-Phi trial, the Pareto front, the beta path and each method family's frontier (its best
    configuration at each of the sweep's betas), from the stored results only."""
    if beta is not None and not (math.isfinite(beta) and beta >= 0):
        raise InputError(
            f"--beta: {beta:g} is not a forgetting weight: Phi = G_id - beta F_ood needs a finite beta >= 0. "
            "Fix: e.g. --beta 1 (0 ignores forgetting), or leave --beta out for the sweep's own"
        )
    from rpsft.sweeps.stages.report import load_selection

    try:
        selection, trials, context = load_selection(name, root=runs_dir, beta=beta, retag=tag)
    except InputError:
        raise
    except ValueError as exc:  # rpsft.sweeps.analysis.selection / rpsft.sweeps.stages.report say "no finished trial" with a ValueError
        raise InputError(str(exc)) from exc
    frontiers = None
    if selection.analysis is not None:  # each family's best configuration at each of the objective's betas
        from rpsft.sweeps.analysis.frontiers import family_frontiers

        frontiers = family_frontiers(selection.analysis)
    if as_json:
        payload = selection.to_dict()
        if frontiers is not None:
            payload["frontiers"] = frontiers.to_dict()
        typer.echo(json.dumps(payload, indent=2))
        return
    from rpsft.sweeps.analysis.summary import frontiers_text, selection_text, trials_table

    text = trials_table(trials, selection.beta, selection) + "\n\n" + selection_text(selection)
    if frontiers is not None:
        text += "\n" + frontiers_text(frontiers)
    view = shared_view_text(context.tracking_uri, context.experiment_id, name, selection.beta)
    typer.echo(text + "\n\nMLflow:" + view)


def export(
    name: str = sweep_name_argument(),
    trial: str | None = typer.Option(
        None,
        help="op (the operating point, default), a reference such as sft, a trial id, or <trial id>@<step> "
        "(a point of its trajectory, retrained up to that step).",
    ),
    out: Path | None = typer.Option(
        None,
        help="Where the checkpoint goes (default <sweep dir>/exports/<trial id>, where `rpsft rl` looks).",
    ),
    runs_dir: Path = runs_dir_option(),
    tolerance: float | None = typer.Option(
        None, help="Largest |retrained - stored| of G_id and F_ood accepted (default 1e-4)."
    ),
) -> None:
    """Export a trial's weights (safetensors + tokenizer).

    A kept trial's weights are downloaded; any other trial is retrained from its stored config and seed and
    checked against its stored metrics (exit 1 when they differ)."""
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.stages.checkpoints import (
        DEFAULT_TOLERANCE,
        ExportMismatch,
        export_name,
        export_trial,
        find_export_point,
    )

    try:
        stored = load_stored_sweep(name, runs_dir)
        if out is None:
            out = stored.store.export_dir(export_name(*find_export_point(stored, trial)))
        export = export_trial(
            stored, trial, out, tolerance if tolerance is not None else DEFAULT_TOLERANCE, echo=typer.echo
        )
    except ExportMismatch as exc:
        typer.secho(f"EXPORT MISMATCH: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    except InputError:
        raise
    except ValueError as exc:  # rpsft.sweeps.analysis.stored_sweep / rpsft.sweeps.analysis.selection report a sweep without trials so
        raise InputError(str(exc)) from exc
    typer.echo(json.dumps(export.to_dict(), indent=2))
    typer.echo(f"check:      {export.check_text()}\ncheckpoint: {export.path}")


def rl(
    sweep: str | None = typer.Option(
        None,
        "--from",
        help="The sweep whose checkpoints start RL (and score it).",
        callback=checked_sweep_name,
    ),
    trials: str = typer.Option("op", help="Comma-separated: op, a reference such as sft, or trial ids."),
    model: Path | None = typer.Option(None, help="Start from this checkpoint instead of the sweep's trials."),
    config: Path | None = typer.Option(None, "--config", help="An RL YAML (see sweeps/configs/rl-*.yaml)."),
    steps: int | None = typer.Option(None, help="Override max_steps."),
    runs_dir: Path = runs_dir_option(),
) -> None:
    """Run RL (DAPO) from a sweep's checkpoints.

    DAPO is TRL's GRPOTrainer with loss_type dapo, started from kept or exported sweep checkpoints, tracked as
    MLflow child runs of the sweep and scored by its evaluation; prints the init -> RL table."""
    from rpsft.sweeps.stages.rl import load_rl_settings, run_rl

    try:
        settings = load_rl_settings(config, {"max_steps": steps})
        outcomes = run_rl(
            settings,
            sweep=sweep,
            trials=[t.strip() for t in trials.split(",") if t.strip()],
            model=str(model) if model else None,
            root=runs_dir,
            echo=typer.echo,
        )
    except InputError:
        raise
    # rpsft.sweeps.stages.rl / rpsft.sweeps.analysis.selection report bad settings as ValueError
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    from rpsft.sweeps.analysis.summary import rl_table

    typer.echo("\n" + rl_table(outcomes))


def regress(
    config: Path = typer.Option(
        ..., "--config", help="A regression YAML (see sweeps/configs/regress-*.yaml)."
    ),
    baseline: Path = typer.Option(..., "--baseline", help="The stored baseline (JSON)."),
    update_baseline: bool = typer.Option(
        False, "--update-baseline", help="Rewrite the baseline from this run instead of comparing."
    ),
    runs_dir: Path | None = typer.Option(
        None,
        "--runs-dir",
        help="Keep the regression sweep's runs under this directory (default: a temporary one, removed afterwards).",
    ),
) -> None:
    """Compare a fixed small sweep with a stored baseline.

    Exits with 1 when a metric regressed or the operating point changed."""
    from rpsft.sweeps.stages.regression import diff_table
    from rpsft.sweeps.stages.regression import regress as run_regression

    outcome = run_regression(
        config, baseline, update_baseline=update_baseline, work_dir=runs_dir, echo=typer.echo
    )
    typer.echo("\n" + diff_table(outcome.rows, outcome.baseline_point, outcome.current_point))
    if outcome.updated:
        typer.echo(f"\nbaseline written: {baseline}")
        return
    failed = [r for r in outcome.rows if r.failed]
    if outcome.failed:
        reasons = [f"{len(failed)} metric(s) regressed or missing"] if failed else []
        if outcome.point_changed:
            reasons.append("the operating point changed")
        typer.secho("\nREGRESSION: " + "; ".join(reasons), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.secho(f"\nno regression ({len(outcome.rows)} metrics compared)", fg=typer.colors.GREEN)


def register(app: typer.Typer, sweep_app: typer.Typer) -> None:
    """Add the sweep verbs to ``sweep_app`` and the other sweep commands to ``app``."""
    sweep_app.command(cls=RpsftCommand)(run)
    sweep_app.command(cls=RpsftCommand)(resume)
    sweep_app.command(cls=RpsftCommand)(select)
    app.command(cls=RpsftCommand)(export)
    app.command(cls=RpsftCommand)(rl)
    app.command(cls=RpsftCommand)(regress)

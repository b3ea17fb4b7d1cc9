"""``rpsft sweep report`` and ``rpsft study``.

:func:`register` adds them to the ``rpsft`` app and its ``sweep`` group.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError
from rpsft.sweeps.cli import runs_dir_option, sweep_name_argument


def report(
    name: str = sweep_name_argument(),
    runs_dir: Path = runs_dir_option(),
    out: Path | None = typer.Option(None, help="Output directory (default: <runs dir>/<name>/report)."),
    diagnostics: Path | None = typer.Option(
        None, help="An `rpsft diagnose --out` directory whose figures the report includes."
    ),
    png: bool = typer.Option(True, help="Also write each figure as PNG (needs Chrome/Chromium)."),
    log: bool = typer.Option(True, help="Log the report as artifacts of the sweep's MLflow parent run."),
    importance: str = typer.Option(
        "ped-anova", help="Optuna's importance evaluator for the knobs: ped-anova or fanova."
    ),
) -> None:
    """Write a sweep's HTML report and its figures.

    The trade-off, Phi(k), parameter importance, parallel coordinates, Phi contours, the per-benchmark table,
    training curves and rotation, as HTML and PNGs."""
    from rpsft.dashboards.report import build_report, log_report
    from rpsft.dashboards.sweep_data import load_sweep_data

    if importance not in ("ped-anova", "fanova"):
        raise InputError(f"--importance: {importance!r} is not an evaluator. Fix: ped-anova or fanova")
    try:
        data = load_sweep_data(name, runs_dir)
        files = build_report(
            data,
            out or Path(runs_dir) / name / "report",
            png=png,
            diagnostics_dir=diagnostics,
            importance=importance,
        )
    except InputError:
        raise
    except (FileNotFoundError, ValueError) as exc:  # a missing --diagnostics file, a sweep without trials
        raise InputError(str(exc)) from exc
    typer.echo(f"report: {files.html}")
    for path in files.pngs:
        typer.echo(f"figure: {path}")
    if log:
        typer.echo(f"MLflow: {log_report(data, files)}")
    from rpsft.sweeps.cli import shared_view_text

    typer.echo(shared_view_text(data.tracking_uri, data.experiment_id, data.name, data.beta).lstrip("\n"))
    if files.png_error:  # asked for and missing: the HTML report is there, the command still fails
        typer.secho(f"error: {files.png_error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


def study(
    config: Path = typer.Argument(..., help="A study YAML (see sweeps/configs/study-*.yaml)."),
    docs: Path = typer.Option(Path("docs"), help="Where reproduction.md is regenerated."),
    address: str | None = typer.Option(None, help="Ray cluster address; default local."),
    png: bool = typer.Option(True, help="Write the study's figures as PNG (needs Chrome/Chromium)."),
    run: bool = typer.Option(True, help="--no-run: only check the claims on the trials stored so far."),
) -> None:
    """Run or resume a reproduction study.

    Checks the paper's claims and writes the study's results and its page."""
    from rpsft.dashboards.reproduction import write_reproduction_page, write_study_figures
    from rpsft.sweeps.stages.study import load_study_config, run_study, write_result

    spec = load_study_config(config)
    result, _ = run_study(spec, address=address, run=run, echo=typer.echo)
    path = write_result(result, spec.results_dir)
    typer.echo(f"results: {path}")
    figures, png_error = write_study_figures(result.to_dict(), spec.results_dir) if png else ([], None)
    for figure in figures:
        typer.echo(f"figure: {figure}")
    typer.echo(f"page: {write_reproduction_page(docs)}")
    for claim in result.claims:
        typer.echo(f"{claim.id} {claim.verdict:15s} {claim.evidence}")
    if png_error:
        typer.secho(f"error: {png_error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


def register(app: typer.Typer, sweep_app: typer.Typer) -> None:
    """Add ``report`` to ``sweep_app`` and ``study`` to ``app``."""
    sweep_app.command(cls=RpsftCommand)(report)
    app.command(cls=RpsftCommand)(study)

"""``rpsft report``."""

from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        name: str = typer.Argument(..., help="The sweep's name."),
        root: Path = typer.Option(Path("runs/sweeps"), help="The sweeps' output_dir."),
        out: Path | None = typer.Option(None, help="Output directory (default: <root>/<name>/report)."),
        diagnostics: Path | None = typer.Option(
            None, help="An `rpsft diagnose --out` directory whose figures the report includes."
        ),
        png: bool = typer.Option(True, help="Also write each figure as PNG (needs Chrome/Chromium)."),
        log: bool = typer.Option(True, help="Log the report as artifacts of the sweep's MLflow parent run."),
    ) -> None:
        """HTML report of a sweep (trade-off, Phi(k), per-benchmark table, training curves, rotation) + PNGs."""
        from dashboards.report import build_report, log_report
        from dashboards.sweep_data import load_sweep_data
        from sweeps.config import SweepConfigError

        try:
            data = load_sweep_data(name, root)
            files = build_report(
                data, out or Path(root) / name / "report", png=png, diagnostics_dir=diagnostics
            )
        except (SweepConfigError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        typer.echo(f"report: {files.html}")
        for path in files.pngs:
            typer.echo(f"figure: {path}")
        if files.png_error:
            typer.secho(files.png_error, fg=typer.colors.YELLOW, err=True)
        if log:
            typer.echo(f"MLflow: {log_report(data, files)}")

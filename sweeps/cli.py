"""``rpsft sweep`` / ``rpsft sweep resume`` / ``rpsft select``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rpsft_core.cli_errors import fail


def _print_outcome(outcome, beta: float) -> None:
    from sweeps.summary import selection_text, trials_table

    typer.echo("\n" + trials_table(outcome.trials, beta, outcome.selection))
    if outcome.selection:
        typer.echo("\n" + selection_text(outcome.selection))
    else:
        typer.echo("\nno finished trial carries G_id/F_ood: nothing to select")
    typer.echo(
        f"\nMLflow: {outcome.tracking_uri}  (experiment id {outcome.experiment_id}, parent run {outcome.parent_run_id})"
        f"\n  browse: mlflow ui --backend-store-uri {outcome.tracking_uri}"
        f"\nsweep state: {outcome.sweep_dir}"
    )


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        target: str = typer.Argument(..., help="A sweep YAML (see sweeps/configs/), or 'resume'."),
        name: str | None = typer.Argument(None, help="With 'resume': the sweep's name."),
        rename: str | None = typer.Option(None, "--name", help="Override the config's sweep name."),
        address: str | None = typer.Option(
            None, help="Ray cluster address ('auto' or host:port); default local."
        ),
        root: Path = typer.Option(Path("runs/sweeps"), help="With 'resume': the sweeps' output_dir."),
    ) -> None:
        """Run a (k, lambda, layers) sweep with Ray Tune + Optuna, tracked in MLflow; or resume one."""
        from sweeps.config import SweepConfigError, load_sweep_config
        from sweeps.runner import resume_sweep, run_sweep

        try:
            if target == "resume":
                if not name:
                    fail("resume: give the sweep's name. Fix: rpsft sweep resume NAME")
                outcome = resume_sweep(name, root=root, address=address, echo=typer.echo)
            else:
                config = load_sweep_config(target, {"name": rename})
                outcome = run_sweep(config, address=address, echo=typer.echo)
        except SweepConfigError as exc:
            fail(str(exc))

        _print_outcome(outcome, outcome.selection.beta if outcome.selection else 1.0)

    @app.command("select")
    def select_cmd(
        name: str = typer.Argument(..., help="The sweep's name."),
        beta: float | None = typer.Option(
            None, help="Forgetting weight of Phi = G_id - beta F_ood (default: the sweep's)."
        ),
        root: Path = typer.Option(Path("runs/sweeps"), help="The sweeps' output_dir."),
        tag: bool = typer.Option(False, help="Move the MLflow operating-point tag to this choice."),
        as_json: bool = typer.Option(False, "--json", help="Print the selection as JSON."),
    ) -> None:
        """The max-Phi trial, the Pareto front and the beta path, from the stored results only."""
        from sweeps.config import SweepConfigError
        from sweeps.report import load_selection

        try:
            selection, trials, context = load_selection(name, root=root, beta=beta, retag=tag)
        except (SweepConfigError, ValueError) as exc:
            fail(str(exc))
        if as_json:
            typer.echo(json.dumps(selection.to_dict(), indent=2))
            return
        from sweeps.summary import selection_text, trials_table

        typer.echo(trials_table(trials, selection.beta, selection) + "\n\n" + selection_text(selection))

    @app.command("export")
    def export_cmd(
        name: str = typer.Argument(..., help="The sweep's name."),
        trial: str | None = typer.Option(
            None, help="op (the operating point, default), a reference such as sft, or a trial id."
        ),
        out: Path | None = typer.Option(
            None,
            help="Where the checkpoint goes (default <sweep dir>/exports/<trial id>, where `rpsft rl` looks).",
        ),
        root: Path = typer.Option(Path("runs/sweeps"), help="The sweeps' output_dir."),
        tolerance: float | None = typer.Option(
            None, help="Largest |retrained - stored| of G_id and F_ood accepted (default 1e-4)."
        ),
    ) -> None:
        """Write a trial's weights (safetensors + tokenizer): downloaded when kept, else retrained from its
        stored config and seed and checked against its stored metrics (exit 1 when they differ)."""
        from sweeps.checkpoints import DEFAULT_TOLERANCE, ExportMismatch, export_trial, find_trial_run
        from sweeps.config import SweepConfigError
        from sweeps.report import load_stored_sweep

        try:
            stored = load_stored_sweep(name, root)
            if out is None:
                out = stored.store.export_dir(find_trial_run(stored, trial).trial_id)
            export = export_trial(
                stored, trial, out, tolerance if tolerance is not None else DEFAULT_TOLERANCE, echo=typer.echo
            )
        except ExportMismatch as exc:
            typer.secho(f"EXPORT MISMATCH: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None
        except (SweepConfigError, ValueError) as exc:
            fail(str(exc))
        typer.echo(json.dumps(export.to_dict(), indent=2))
        typer.echo(f"checkpoint: {export.path}")

    @app.command("rl")
    def rl_cmd(
        sweep: str | None = typer.Option(
            None, "--from", help="The sweep whose checkpoints start RL (and score it)."
        ),
        trials: str = typer.Option("op", help="Comma-separated: op, a reference such as sft, or trial ids."),
        model: Path | None = typer.Option(
            None, help="Start from this checkpoint instead of the sweep's trials."
        ),
        config: Path | None = typer.Option(
            None, "--config", help="An RL YAML (see sweeps/configs/rl-*.yaml)."
        ),
        steps: int | None = typer.Option(None, help="Override max_steps."),
        root: Path = typer.Option(Path("runs/sweeps"), help="The sweeps' output_dir."),
    ) -> None:
        """DAPO (TRL GRPOTrainer, loss_type dapo) from kept or exported sweep checkpoints, tracked as MLflow
        child runs of the sweep and scored by its evaluation; prints the init -> RL table."""
        from sweeps.config import SweepConfigError
        from sweeps.rl import load_rl_settings, run_rl

        try:
            settings = load_rl_settings(config, {"max_steps": steps})
            outcomes = run_rl(
                settings,
                sweep=sweep,
                trials=[t.strip() for t in trials.split(",") if t.strip()],
                model=str(model) if model else None,
                root=root,
                echo=typer.echo,
            )
        except (SweepConfigError, ValueError) as exc:
            fail(str(exc))
        from sweeps.summary import rl_table

        typer.echo("\n" + rl_table(outcomes))

    @app.command()
    def regress(
        config: Path = typer.Option(
            ..., "--config", help="A regression YAML (see sweeps/configs/regress-*.yaml)."
        ),
        baseline: Path = typer.Option(..., "--baseline", help="The stored baseline (JSON)."),
        update_baseline: bool = typer.Option(
            False, "--update-baseline", help="Rewrite the baseline from this run instead of comparing."
        ),
        work_dir: Path | None = typer.Option(
            None, help="Keep the sweep's runs here (default: a temporary directory, removed afterwards)."
        ),
    ) -> None:
        """Run a fixed small sweep and compare its metrics with a baseline; exit 1 on a regression."""
        from sweeps.config import SweepConfigError
        from sweeps.regression import diff_table, regress

        try:
            outcome = regress(
                config, baseline, update_baseline=update_baseline, work_dir=work_dir, echo=typer.echo
            )
        except SweepConfigError as exc:
            fail(str(exc))
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

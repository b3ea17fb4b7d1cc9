"""``rpsft diagnose``: registered on the ``rpsft`` app by :mod:`rpsft.cli` (heavy imports inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _parse_layers(text: str):
    text = text.strip()
    if text.startswith("{"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(
                f"--layers: {text!r} is not a valid spec ({exc}). Fix: e.g. \"{{types: [q, o], layers: '0:4'}}\""
            ) from None
    return text


def register(app: typer.Typer) -> None:
    @app.command(cls=RpsftCommand, context_settings={"allow_extra_args": True})
    def diagnose(
        ctx: typer.Context,
        base: str = typer.Option(
            "smollm2-135m-instruct", help="Base model: embedded name, HF dir, .gguf, hub id."
        ),
        tuned: list[str] | None = typer.Option(
            None,
            "--tuned",
            help="Tuned checkpoint(s): --tuned A B C, repeated --tuned, or a comma list.",
        ),
        data: list[str] | None = typer.Option(
            None, "--data", help="ID prompts: JSONL path(s) (repeat or comma list) or demo-math:N."
        ),
        ood_data: list[str] | None = typer.Option(None, "--ood-data", help="OOD prompts: JSONL path(s)."),
        out: Path = typer.Option(Path("runs/diagnostics"), "--out", help="Output directory."),
        names: str | None = typer.Option(None, help="Comma list of labels for the tuned models."),
        what: str = typer.Option(
            "energy,rotation,first-order,hidden,entropy", help="Comma list of diagnostics to run."
        ),
        limit: int = typer.Option(16, help="Prompts per dataset."),
        max_new_tokens: int = typer.Option(128, help="Greedy decoding length for the entropy diagnostic."),
        matrix: str | None = typer.Option(
            None,
            help="Energy probe(s) and rankwise matrix (default: model.layers.1.self_attn.q_proj.weight).",
        ),
        layers: str = typer.Option(
            "all", help="Matrices for rotation / first-order: preset or {types, layers}."
        ),
        top_k: int = typer.Option(512, help="K of the rotation metric: top-min(K, m, n) left subspace."),
        energy_target: float = typer.Option(0.2, help="Energy target of the rank rule."),
        batch_size: int = typer.Option(4),
        max_length: int = typer.Option(512, help="Tokens kept per prompt (the last ones)."),
        basis_method: str = typer.Option("gram", help="Subspaces for rotation: gram | exact | randomized."),
        device: str | None = typer.Option(None, help="cpu / cuda (default: cuda if available)."),
        figures: bool = typer.Option(True, help="Write PNG figures (needs matplotlib)."),
    ) -> None:
        """Diagnose tuned checkpoints against their base.

        The energy rank rule, rotation, first-order signal, hidden drift and entropy. Writes
        <out>/diagnostics.json and PNGs, prints a table."""
        extra = list(ctx.args)
        bad = [a for a in extra if a.startswith("-") or a.endswith(".jsonl")]
        if bad:
            raise InputError(
                f"unexpected argument(s) {bad}: bare arguments after the options are read as tuned models. "
                "Fix: give several data files as --data A.jsonl --data B.jsonl or --data A.jsonl,B.jsonl"
            )
        tuned_paths = _split(tuned) + extra
        from rpsft.evaluation.diagnostics.run import diagnose as run_diagnose
        from rpsft.evaluation.diagnostics.run import format_table

        try:
            results = run_diagnose(
                base,
                tuned_paths,
                data=_split(data),
                ood_data=_split(ood_data),
                out_dir=out,
                names=_split([names]) if names else None,
                what=what,
                limit=limit,
                max_new_tokens=max_new_tokens,
                matrix=matrix,
                layers=_parse_layers(layers),
                top_k=top_k,
                energy_target=energy_target,
                batch_size=batch_size,
                max_length=max_length,
                basis_method=basis_method,
                device=device,
                figures=figures,
                log=lambda message: typer.echo(message, err=True),
            )
        except InputError:
            raise
        except ValueError as exc:  # bad input; a bug or an out-of-memory error keeps its traceback
            raise InputError(str(exc)) from exc
        typer.echo(format_table(results))
        typer.echo(f"results: {out / 'diagnostics.json'}")
        if results.get("figures"):
            typer.echo("figures: " + ", ".join(str(out / f) for f in results["figures"]))

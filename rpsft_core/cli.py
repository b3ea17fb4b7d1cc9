"""The ``rpsft`` command line."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import typer

from rpsft_core.cli_errors import fail
from rpsft_core.method_table import METHOD_NAMES

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Rotation-Preserving SFT: train, sweep, evaluate."
)


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML training config (see configs/)."),
    model: str | None = typer.Option(None, help="Embedded name, HF directory, .gguf file or hub id."),
    data: str | None = typer.Option(None, help="JSONL path, demo-math[:N], or hf:<dataset>[:split]."),
    method: str | None = typer.Option(None, help=f"{', '.join(METHOD_NAMES)} (see `rpsft methods`)."),
    k: str | None = typer.Option(
        None,
        help="Protected rank: an int, a fraction of each matrix's rank, or auto / auto@<energy target> "
        "(the energy rule on the base model).",
    ),
    lam: float | None = typer.Option(None, "--lambda", help="Penalty strength."),
    layers: str | None = typer.Option(None, help="Layer preset: all, attn, mlp, early-attn, ..."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps."),
    output_dir: str | None = typer.Option(None, help="Where the checkpoint and metrics.json go."),
    seed: int | None = typer.Option(None),
) -> None:
    """Fine-tune one model; writes <output_dir>/model (HF checkpoint) and <output_dir>/metrics.json."""
    from rpsft_core.config import ConfigError, load_train_config
    from rpsft_core.errors import InputError
    from rpsft_core.rank_rule import k_spec_value

    k_value = None
    if k is not None:
        try:
            k_value = k_spec_value(k)
        except ValueError as exc:
            fail(f"--{exc}")  # "k: ..." -> "--k: ..."
    overrides = dict(
        model=model,
        data=data,
        method=method,
        k=k_value,
        layers=layers,
        max_steps=max_steps,
        output_dir=output_dir,
        seed=seed,
    )
    overrides["lambda"] = lam
    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))
    from rpsft_core.train import train as run_train

    try:
        result = run_train(cfg)
    except InputError as exc:  # input the user can fix; a bug or an out-of-memory error keeps its traceback
        fail(f"error: {exc}")
    summary = {
        key: result.metrics[key]
        for key in (
            "train_loss",
            "global_steps",
            "train_seconds",
            "bases_seconds",
            "n_examples",
            "drift_mean",
            "k_resolved",
        )
    }
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"checkpoint: {result.output_dir / 'model'}\nmetrics:    {result.output_dir / 'metrics.json'}")


@app.command()
def methods() -> None:
    """The training methods: what each trains, its penalty, its loss and the knobs it reads (Markdown)."""
    from rpsft_core.method_table import methods_markdown

    typer.echo(methods_markdown())


@app.command()
def models(
    prepare: str | None = typer.Option(None, help="Dequantize and cache this embedded model now."),
) -> None:
    """List the embedded models (and optionally cache one)."""
    from rpsft_core.models import EMBEDDED_MODELS, default_cache_dir, resolve_model_dir

    for name, entry in EMBEDDED_MODELS.items():
        cached = (default_cache_dir() / "models" / name).exists()
        typer.echo(f"{name:24s} {'cached' if cached else 'not cached':11s} {entry.description}")
    if prepare:
        if prepare not in EMBEDDED_MODELS:
            fail(f"--prepare: unknown embedded model {prepare!r}. Fix: one of {', '.join(EMBEDDED_MODELS)}")
        typer.echo(resolve_model_dir(prepare))


# Commands of the other packages: each module defines ``register(app)`` and imports its heavy dependencies
# inside the command functions, so ``rpsft --help`` stays fast.
COMMAND_MODULES = ("evaluation.diagnostics.cli", "evaluation.cli", "sweeps.cli", "dashboards.cli")


def _register_commands() -> None:
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            continue
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            importlib.import_module(module_name).register(app)


_register_commands()


def main() -> None:  # pragma: no cover
    sys.exit(app())

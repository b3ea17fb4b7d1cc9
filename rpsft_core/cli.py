"""The core's ``rpsft`` commands: ``train``, ``methods`` and ``models``.

:func:`register` adds them to an app; the ``rpsft`` app (:mod:`rpsft.cli`) assembles them with the commands
of the evaluation, sweep and dashboard packages. :data:`app` holds the core's commands alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rpsft.core.cli_errors import InputErrorGroup, check_options
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError
from rpsft.core.method_table import METHOD_NAMES


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
    out: str | None = typer.Option(None, "--out", help="Where the checkpoint and metrics.json go."),
    seed: int | None = typer.Option(None),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Training processes on this machine (resources.workers): one process group, FSDP2 by default "
        "(resources.strategy); gloo on CPUs, NCCL with one GPU per worker.",
    ),
) -> None:
    """Fine-tune one model.

    Writes <out>/model (an HF checkpoint) and <out>/metrics.json."""
    from rpsft.core.config import load_train_config
    from rpsft.core.k_spec import k_spec_value

    k_value = None
    if k is not None:
        try:
            k_value = k_spec_value(k)
        except ValueError as exc:
            raise InputError(f"--{exc}") from None  # "k: ..." -> "--k: ..."
    overrides = dict(
        model=model,
        data=data,
        method=method,
        k=k_value,
        layers=layers,
        max_steps=max_steps,
        output_dir=out,
        seed=seed,
    )
    overrides["lambda"] = lam
    from rpsft.core.config import TrainConfig

    option_names = {"output_dir": "--out", "max_steps": "--max-steps"}
    check_options(
        TrainConfig,
        {field: (option_names.get(field, f"--{field}"), value) for field, value in overrides.items()},
        "rpsft train",
    )
    if workers is not None:
        overrides["resources"] = {"workers": workers}
    cfg = load_train_config(config, overrides)
    from rpsft.core.memory.preflight import preflight_train_memory

    preflight_train_memory(cfg)  # a run that cannot fit fails here, with the numbers and the fixes
    if cfg.resources.distributed:
        from rpsft.core.sharded_train import train_local_workers

        result = train_local_workers(cfg)
    else:
        from rpsft.core.train import train as run_train

        result = run_train(cfg)
    summary = {
        key: result.metrics.get(key)
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


def methods() -> None:
    """List the training methods.

    What each trains, its penalty, its loss and the knobs it reads (Markdown)."""
    from rpsft.core.method_table import methods_markdown

    typer.echo(methods_markdown())


def models(
    prepare: str | None = typer.Option(None, help="Dequantize and cache this embedded model now."),
) -> None:
    """List the embedded models (and optionally cache one)."""
    from rpsft.core.models import EMBEDDED_MODELS, default_cache_dir, resolve_model_dir

    for name, entry in EMBEDDED_MODELS.items():
        cached = (default_cache_dir() / "models" / name).exists()
        typer.echo(f"{name:24s} {'cached' if cached else 'not cached':11s} {entry.description}")
    if prepare:
        if prepare not in EMBEDDED_MODELS:
            raise InputError(
                f"--prepare: unknown embedded model {prepare!r}. Fix: one of {', '.join(EMBEDDED_MODELS)}"
            )
        typer.echo(resolve_model_dir(prepare))


def register(app: typer.Typer) -> None:
    """Add the core's commands to ``app``."""
    app.command(cls=RpsftCommand)(train)
    app.command(cls=RpsftCommand)(methods)
    app.command(cls=RpsftCommand)(models)


app = typer.Typer(
    cls=InputErrorGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Rotation-Preserving SFT, the core's commands: train, methods, models "
    "(the full app, with eval and sweep, is `rpsft`, rpsft.cli:app).",
)
register(app)

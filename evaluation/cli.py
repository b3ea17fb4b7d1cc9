"""``rpsft eval``: score a model on the ID math and OOD benchmarks through lm-eval; print a table, write JSON.

Registered into the ``rpsft`` app by :func:`register`; heavy imports happen inside the command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError


def _label(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model).strip("_") or "model"


def eval_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Embedded name, HF directory, .gguf or hub id."
    ),
    suite: str | None = typer.Option(
        None, help="Comma list of suites (id, ood, all) and/or benchmark names. Default: id,ood."
    ),
    exclude: str | None = typer.Option(None, help="Comma list of benchmarks to leave out (e.g. supergpqa)."),
    data_dir: str | None = typer.Option(
        None, help="Directory with id/*.jsonl and ood/*.jsonl (paper-data format). Default: the hub."
    ),
    subset: str | None = typer.Option(
        None, help="full (default) or test: the smaller *_test.jsonl where present."
    ),
    samples: int | None = typer.Option(
        None, "--samples", help="Samples per item for every benchmark (default: the paper's number)."
    ),
    pass_k: int | None = typer.Option(None, help="k of pass@k (default: the number of samples)."),
    limit: int | None = typer.Option(None, help="First N items of each benchmark."),
    max_new_tokens: int | None = typer.Option(None, help="Generation length (default 1024)."),
    batch_size: int | None = typer.Option(None, help="Generation batch size (default 8)."),
    temperature: float | None = typer.Option(
        None, help="Sampling temperature (default: greedy with 1 sample, else 0.6)."
    ),
    seed: int | None = typer.Option(None),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML eval settings (configs/eval-*.yaml)."
    ),
    benchmarks_file: str | None = typer.Option(
        None,
        help="YAML with extra benchmark entries, or a directory of them. An entry names items (name, suite, "
        "scorer, file) or an lm-eval task (suite and task: a registry name such as arc_challenge, a task YAML "
        "or a directory), scored by the task's own primary metric.",
    ),
    include_path: str | None = typer.Option(
        None, help="Comma list of directories of lm-eval task YAML that task entries may name (lm-eval's)."
    ),
    task_chat_template: bool = typer.Option(
        False,
        "--task-chat-template",
        help="Apply the model's chat template to the lm-eval tasks of task entries (lm-eval does not by default).",
    ),
    base: str | None = typer.Option(
        None,
        help="Base model: also print G_id, F_ood and Phi with 95% paired bootstrap intervals (base scores cached).",
    ),
    beta: str | None = typer.Option(None, help="Comma list of beta values for Phi (default 0.5,1.0)."),
    loss: bool = typer.Option(
        False, "--loss", help="Also compute the loss-based G_id / F_ood against --base."
    ),
    cache_dir: str | None = typer.Option(None, help="Cache for base scores (default ~/.cache/rpsft/eval)."),
    backend: str | None = typer.Option(
        None, help="auto (default: vllm where installed and a GPU is present, else hf), hf or vllm."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="JSON output (default runs/eval/<model>.json)."
    ),
    log_samples: bool = typer.Option(False, "--log-samples", help="Keep every response in the JSON."),
    write_tasks: Path | None = typer.Option(
        None, help="Write the lm-eval task YAML to this directory (for lm_eval --include_path) and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show lm-eval's log messages."),
) -> None:
    """Score a model on the benchmarks.

    lm-eval scores it; prints a table and writes JSON."""
    from rpsft.core.cli_errors import check_options
    from rpsft.evaluation.settings import EvalSettings, load_eval_settings, plan_evaluation

    options = {  # EvalSettings field: (its option, the value given)
        "suite": ("--suite", suite),
        "exclude": ("--exclude", exclude),
        "data_dir": ("--data-dir", data_dir),
        "subset": ("--subset", subset),
        "k": ("--samples", samples),
        "pass_k": ("--pass-k", pass_k),
        "limit": ("--limit", limit),
        "max_new_tokens": ("--max-new-tokens", max_new_tokens),
        "batch_size": ("--batch-size", batch_size),
        "temperature": ("--temperature", temperature),
        "seed": ("--seed", seed),
        "benchmarks_file": ("--benchmarks-file", benchmarks_file),
        "betas": ("--beta", beta),
        "cache_dir": ("--cache-dir", cache_dir),
        "backend": ("--backend", backend),
        "include_path": ("--include-path", include_path),
        "task_chat_template": ("--task-chat-template", task_chat_template or None),
    }
    check_options(EvalSettings, options, "rpsft eval")
    settings = load_eval_settings(config, {field: value for field, (_, value) in options.items()})
    plan = plan_evaluation(settings)
    for note in filter(None, (t.repeats_note() for t in plan.tasks)):
        typer.echo(f"note: {note}")
    if write_tasks is not None:
        from rpsft.evaluation.lm_eval_tasks import write_task_dir

        write_task_dir(plan, write_tasks)
        typer.echo(f"wrote {len(plan.own_tasks)} task(s) to {write_tasks}: {', '.join(plan.task_names)}")
        return
    if model is None:
        raise InputError("--model is required. Fix: e.g. --model smollm2-135m-instruct")
    loss_settings = None
    if loss:
        if base is None:
            raise InputError("--loss compares against a base model. Fix: add --base MODEL")
        loss_settings = _loss_settings(settings, plan)

    from rpsft.core.models import load_model
    from rpsft.evaluation.backends import resolve_backend
    from rpsft.evaluation.runner import evaluate

    def scored(name: str):  # what the backend scores: vLLM loads its own copy by name
        return (name, None) if resolve_backend(settings.backend, name) == "vllm" else load_model(name)

    tuned_model, tokenizer = scored(model)
    result = evaluate(
        tuned_model,
        tokenizer,
        settings,
        plan=plan,
        model_label=model,
        log_samples=log_samples,
        verbose=verbose,
    )
    typer.echo(f"model: {model}   ({result.seconds:.1f} s)")
    typer.echo(result.table())
    payload: dict = {"result": json.loads(result.model_dump_json())}
    if base is not None:
        from rpsft.evaluation.scoring import base_scores, compute_tradeoff

        base_model, base_tok = scored(base)
        base_result, hit = base_scores(
            base_model, base_tok, settings, plan=plan, model_label=base, verbose=verbose
        )
        trade = compute_tradeoff(base_result, result, settings.betas)
        typer.echo(f"\nbase: {base}   ({'cached' if hit else f'{base_result.seconds:.1f} s'})")
        typer.echo(base_result.table())
        intervals = _intervals(base_result, result, settings)
        typer.echo("\n" + _tradeoff_lines("score (95% paired bootstrap intervals)", trade, intervals))
        payload["base"] = json.loads(base_result.model_dump_json())
        payload["tradeoff"] = json.loads(trade.model_dump_json())
        payload["intervals"] = {name: interval.to_dict() for name, interval in intervals.items()}
        if loss_settings is not None:
            from rpsft.evaluation.loss_metrics import loss_tradeoff

            if isinstance(tuned_model, str):  # scored by vLLM: the loss metrics need the weights here
                tuned_model, tokenizer = load_model(model)
                base_model, _ = load_model(base)
            from rpsft.evaluation.loss_metrics import loss_items
            from rpsft.evaluation.progress import progress_bar

            items = loss_items(loss_settings)
            n_ood = sum(len(p) for p in items.ood_prompts.values())
            n_id = sum(len(c) for c in items.id_conversations.values())
            with progress_bar(
                "loss metrics", total=3 * n_ood + 2 * n_id
            ):  # at most: cached parts are skipped
                lt = loss_tradeoff(
                    tuned_model, tokenizer, loss_settings, base_model=base_model, betas=settings.betas
                )
            typer.echo(_tradeoff_lines("loss (NLL)", lt.nll))
            if lt.kl is not None:
                typer.echo(_tradeoff_lines("loss (KL)", lt.kl))
            payload["loss_tradeoff"] = json.loads(lt.model_dump_json())
    out = out or Path("runs") / "eval" / f"{_label(model)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    typer.echo(f"json: {out}")


def _loss_settings(settings, plan):
    """The loss metrics' settings for ``rpsft eval --loss``, bounded by the plan's benchmarks (``--suite`` and
    ``--exclude``): its built-in ID benchmarks with reference solutions and its built-in OOD benchmarks."""
    from rpsft.evaluation.benchmarks import build_registry
    from rpsft.evaluation.loss_metrics import LossSettings, loss_items

    builtin = build_registry()  # the loss metrics read the built-in benchmarks, as a sweep's do
    chosen = [t.bench for t in plan.tasks if builtin.get(t.bench.name) == t.bench]
    id_names = [b.name for b in chosen if b.suite == "id" and b.has_solutions]
    ood_names = [b.name for b in chosen if b.suite == "ood"]
    if not id_names and not ood_names:
        raise InputError(
            "--loss: the selected benchmarks have no ID benchmark with reference solutions and no OOD benchmark "
            "with items. Fix: add one to --suite (e.g. math500, gpqa)"
        )
    loss_settings = LossSettings(
        data_dir=settings.data_dir,
        subset=settings.subset,
        cache_dir=settings.cache_dir,
        batch_size=settings.batch_size,
        max_new_tokens=min(128, settings.max_new_tokens),
        id_benchmarks=id_names,
        ood_benchmarks=ood_names,
        **({"n_id": settings.limit, "n_ood": settings.limit} if settings.limit else {}),
    )
    loss_items(loss_settings)
    return loss_settings


def _intervals(base_result, result, settings) -> dict:
    """95% paired bootstrap intervals of G_id, F_ood and Phi from the two results' per-item scores."""
    from rpsft.evaluation.intervals import bootstrap_tradeoff

    draws = bootstrap_tradeoff(
        base_result.item_scores(), {"tuned": [result.item_scores()]}, seed=settings.seed
    )
    return draws.summary("tuned", settings.betas)


def _tradeoff_lines(name: str, trade, intervals: dict | None = None) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:+.4f}"

    def bounds(key: str) -> str:
        interval = (intervals or {}).get(key)
        if interval is None or interval.low != interval.low:  # NaN: the suite has no items
            return ""
        return f" [{interval.low:+.4f}, {interval.high:+.4f}]"

    phis = "  ".join(f"Phi(beta={b})={fmt(v)}{bounds(f'phi@{float(b):g}')}" for b, v in trade.phi.items())
    return (
        f"{name}: G_id={fmt(trade.g_id)}{bounds('g_id')}  F_ood={fmt(trade.f_ood)}{bounds('f_ood')}  {phis}"
    )


def register(app: typer.Typer) -> None:
    app.command("eval", cls=RpsftCommand)(eval_command)

"""``rpsft diagnose``: every diagnostic for a base model against tuned checkpoints, as JSON and PNG figures.

:func:`diagnose` is one loop over the chosen :data:`~rpsft.evaluation.diagnostics.catalog.DIAGNOSTICS`: it loads
the base model once and lets each diagnostic measure it (energy curve, top-K subspaces, dataset gradients,
pooled hidden states, entropies), then loads one tuned model at a time and lets each measure it.
Outputs: ``<out>/diagnostics.json`` and, when matplotlib (the ``diagnostics`` extra) is installed,
``energy.png``, ``rotation_layerwise.png``, ``rotation_rankwise.png``, ``first_order.png``, ``hidden_pca.png``,
``entropy_kde.png`` (listed under ``figures`` in the JSON, relative to ``<out>``).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rpsft.core.prompts import load_prompt_examples
from rpsft.core.rank_rule import probe_names
from rpsft.evaluation.diagnostics import plots
from rpsft.evaluation.diagnostics.catalog import DIAGNOSTICS
from rpsft.evaluation.diagnostics.protocol import DiagnoseContext, DiagnoseSettings, Diagnostic, PromptSet
from torch import nn

ALL_DIAGNOSTICS = tuple(diagnostic.name for diagnostic in DIAGNOSTICS)
_ALIASES = {"first_order": "first-order", "firstorder": "first-order", "drift": "hidden", "rank": "energy"}


def parse_what(what: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"rotation,hidden"`` (or a list, or ``all``) -> the diagnostics to run, in canonical order."""
    if what is None:
        return ALL_DIAGNOSTICS
    items = what.split(",") if isinstance(what, str) else list(what)
    chosen = set()
    for item in items:
        key = _ALIASES.get(item.strip().lower(), item.strip().lower())
        if not key:
            continue
        if key == "all":
            chosen.update(ALL_DIAGNOSTICS)
        elif key in ALL_DIAGNOSTICS:
            chosen.add(key)
        else:
            raise ValueError(
                f"what: unknown diagnostic {item!r}. Fix: a comma list of {', '.join(ALL_DIAGNOSTICS)}"
            )
    if not chosen:
        raise ValueError(f"what: nothing selected. Fix: a comma list of {', '.join(ALL_DIAGNOSTICS)}")
    return tuple(d for d in ALL_DIAGNOSTICS if d in chosen)


def model_labels(paths: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """Labels of the tuned models: ``names`` if given, else ``runs/a/model`` -> ``a``, ``dir`` -> ``dir``."""
    if names:
        if len(names) != len(paths):
            raise ValueError(f"names: {len(names)} name(s) for {len(paths)} tuned model(s)")
        labels = list(names)
    else:
        labels = []
        for raw in paths:
            path = Path(str(raw).rstrip("/"))
            label = path.parent.name if path.name == "model" and path.parent.name else path.stem or path.name
            labels.append(label or str(raw))
    seen: dict[str, int] = {"base": 1}
    out = []
    for label in labels:
        if label in seen:
            seen[label] += 1
            label = f"{label}-{seen[label]}"
        seen[label] = 1
        out.append(label)
    return out


def _selection_name(layers: Any) -> Any:
    return layers if isinstance(layers, str) else json.loads(json.dumps(layers, default=str))


class _Timings(dict):
    """Seconds per step (``load``, each diagnostic's name, ``figures``), summed over calls."""

    def timed(self, key: str, work: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            self[key] = self.get(key, 0.0) + time.perf_counter() - started


def diagnose(
    base: str | tuple,
    tuned: Sequence[str] = (),
    *,
    data: Sequence[str] = (),
    ood_data: Sequence[str] = (),
    out_dir: str | Path = "runs/diagnostics",
    names: Sequence[str] | None = None,
    what: str | Sequence[str] | None = None,
    limit: int | None = 16,
    max_new_tokens: int = 128,
    matrix: str | None = None,
    layers: Any = "all",
    top_k: int = 512,
    rank_points: int = 64,
    energy_target: float = 0.2,
    batch_size: int = 4,
    max_length: int = 512,
    basis_method: str = "gram",
    device: str | None = None,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen diagnostics (default all) and write ``<out_dir>/diagnostics.json`` (+ PNGs).

    ``base``: a model name/path (or a loaded ``(model, tokenizer)``); ``tuned``: checkpoint paths;
    ``data`` / ``ood_data``: ID / OOD prompt sources (JSONL paths, ``demo-math[:N]``), ``limit`` prompts each;
    ``matrix``: the energy probe(s) (comma list; default layer-1 ``q_proj``) and the rankwise case-study
    matrix (the first); ``layers``: the matrices for rotation and first-order signal (preset or spec);
    ``top_k``: K of the rotation metric.
    """
    from rpsft.core.models import load_model

    log = log or (lambda _msg: None)
    chosen = parse_what(what)
    diagnostics = [diagnostic() for diagnostic in DIAGNOSTICS if diagnostic.name in chosen]
    tuned = list(tuned)
    labels = model_labels(tuned, names)
    if any(d.needs_tuned for d in diagnostics) and not tuned:
        raise ValueError("tuned: no tuned model given. Fix: --tuned PATH (or --what energy alone)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = DiagnoseSettings(
        limit=limit,
        max_new_tokens=max_new_tokens,
        layers=layers,
        top_k=top_k,
        rank_points=rank_points,
        energy_target=energy_target,
        batch_size=batch_size,
        max_length=max_length,
        basis_method=basis_method,
    )
    datasets = load_prompt_sets(data, ood_data, limit)
    if any(d.needs_data for d in diagnostics) and not datasets:
        raise ValueError(
            "data: no prompts. Fix: --data ID.jsonl and/or --ood-data OOD.jsonl (or demo-math:N)"
        )
    timings = _Timings()
    base_model, tokenizer, base_name = timings.timed("load", _load_base, base, device)
    context = DiagnoseContext(
        base_model, tokenizer, datasets, settings, probe_names(base_model, matrix), log=log
    )
    results: dict[str, Any] = {
        "base": base_name,
        "tuned": dict(zip(labels, tuned)),
        "what": list(chosen),
        "datasets": {
            k: {"role": v.role, "source": v.source, "n": len(v.examples)} for k, v in datasets.items()
        },
        "settings": {
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "layers": _selection_name(layers),
            "top_k": top_k,
            "energy_target": energy_target,
            "basis_method": basis_method,
            "max_length": max_length,
            "matrix": context.case_matrix,
            "probes": context.probes,
        },
    }
    for diagnostic in diagnostics:
        timings.timed(diagnostic.name, diagnostic.start, context)
    for label, path in zip(labels, tuned):
        log(f"loading {label}: {path}")
        model, _ = timings.timed("load", lambda p: load_model(p, device=device), path)
        for diagnostic in diagnostics:
            timings.timed(diagnostic.name, diagnostic.measure, label, model)
        del model
        gc.collect()
    for diagnostic in diagnostics:
        results.update(diagnostic.results())
    results["timings"] = timings
    if figures and plots.available():
        results["figures"] = timings.timed("figures", draw_figures, diagnostics, results, out_dir)
    else:
        if figures:
            results["figures_skipped"] = plots.MISSING
        results["figures"] = []
    (out_dir / "diagnostics.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return results


def load_prompt_sets(data: Sequence[str], ood_data: Sequence[str], limit: int | None) -> dict[str, PromptSet]:
    """The ID and OOD prompt sets by name (a file's stem; ``<name>-<role>`` when both roles use a name)."""
    datasets: dict[str, PromptSet] = {}
    for role, sources in (("id", data), ("ood", ood_data)):
        for source in sources:
            name, examples = load_prompt_examples(source, limit)
            key = name if name not in datasets else f"{name}-{role}"
            datasets[key] = PromptSet(role, str(source), examples)
    return datasets


def _load_base(base: str | tuple, device: str) -> tuple[nn.Module, Any, str]:
    if isinstance(base, tuple):
        base_model, tokenizer = base
        return (
            base_model,
            tokenizer,
            getattr(getattr(base_model, "config", None), "_name_or_path", "") or "base",
        )
    from rpsft.core.models import load_model

    base_model, tokenizer = load_model(base, device=device)
    return base_model, tokenizer, str(base)


def draw_figures(diagnostics: Sequence[Diagnostic], results: dict[str, Any], out_dir: Path) -> list[str]:
    """Every figure of the diagnostics that ran, under ``out_dir``; their file names, in order."""
    written = []
    for diagnostic in diagnostics:
        for filename, make in diagnostic.figures(results).items():
            make(out_dir / filename)
            written.append(filename)
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_table(results: dict[str, Any]) -> str:
    """A short text table: per model, rotation, first-order signal, hidden drift and entropy per dataset."""
    lines: list[str] = []
    if "energy" in results:
        energy = results["energy"]
        for name, curve in energy["matrices"].items():
            lines.append(
                f"energy  {name}: {100 * curve['energy_at_suggested']:.1f}% of the gradient energy in the top "
                f"{curve['suggested_rank']}x{curve['suggested_rank']} block (R = {curve['rank']}, "
                f"x = {100 * curve['block_fraction']:.2f}%)"
            )
        lines.append(
            f"energy  suggested k = {energy['k_fraction']:.4f} (rank fraction, target {energy['target']:g})"
        )
    datasets = list(results.get("datasets", {}))
    columns: list[tuple[str, Callable[[str], Any]]] = []
    if "rotation" in results:
        top_k = results["settings"]["top_k"]
        columns.append((f"rot@{top_k} deg", lambda m: results["rotation"].get(m, {}).get("mean_deg", 0.0)))
        columns.append(("rot max", lambda m: results["rotation"].get(m, {}).get("max_deg", 0.0)))
    for key in datasets:
        if "first_order" in results:
            columns.append(
                (
                    f"fo[{key}]",
                    lambda m, key=key: results["first_order"].get(m, {}).get(key, {}).get("mean", 0.0),
                )
            )
        if "hidden" in results:
            columns.append((f"drift[{key}]", lambda m, key=key: results["hidden"][key]["distance"][m]))
        if "entropy" in results:
            columns.append((f"H[{key}]", lambda m, key=key: results["entropy"][key][m]["mean"]))
    models = ["base", *results.get("tuned", {})]
    if columns:
        width = max(12, *(len(c) + 1 for c, _ in columns))
        name_width = max(8, *(len(m) + 1 for m in models))
        lines.append("model".ljust(name_width) + "".join(c.rjust(width) for c, _ in columns))
        for m in models:
            cells = []
            for _, get in columns:
                try:
                    value = get(m)
                    cells.append(f"{value:.4g}".rjust(width))
                except (KeyError, TypeError):
                    cells.append("-".rjust(width))
            lines.append(m.ljust(name_width) + "".join(cells))
    return "\n".join(lines)

"""``rpsft diagnose``: every diagnostic for a base model against tuned checkpoints, as JSON and PNG figures.

:func:`diagnose` loads the base model once, computes its side of each diagnostic (energy curve, top-K
subspaces, dataset gradients, pooled hidden states, entropies), then loads one tuned model at a time.
Outputs: ``<out>/diagnostics.json`` and, when matplotlib is installed, ``energy.png``,
``rotation_layerwise.png``, ``rotation_rankwise.png``, ``first_order.png``, ``hidden_pca.png``,
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

ALL_DIAGNOSTICS = ("energy", "rotation", "first-order", "hidden", "entropy")
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
    from rpsft_core.diagnostics import energy as energy_mod
    from rpsft_core.diagnostics import entropy as entropy_mod
    from rpsft_core.diagnostics import first_order as fo_mod
    from rpsft_core.diagnostics import hidden as hidden_mod
    from rpsft_core.diagnostics import plots
    from rpsft_core.diagnostics import rotation as rot_mod
    from rpsft_core.diagnostics._common import resolve_names
    from rpsft_core.diagnostics.prompts import load_prompt_examples
    from rpsft_core.models import load_model

    log = log or (lambda _msg: None)
    chosen = parse_what(what)
    tuned = list(tuned)
    labels = model_labels(tuned, names)
    if any(d != "energy" for d in chosen) and not tuned:
        raise ValueError("tuned: no tuned model given. Fix: --tuned PATH (or --what energy alone)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}

    def tick(key: str, started: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started

    # ---- data
    datasets: dict[str, dict[str, Any]] = {}
    for role, sources in (("id", data), ("ood", ood_data)):
        for source in sources:
            name, examples = load_prompt_examples(source, limit)
            key = name if name not in datasets else f"{name}-{role}"
            datasets[key] = {"role": role, "source": str(source), "examples": examples}
    needs_data = {"first-order", "hidden", "entropy", "energy"} & set(chosen)
    if needs_data and not datasets:
        raise ValueError(
            "data: no prompts. Fix: --data ID.jsonl and/or --ood-data OOD.jsonl (or demo-math:N)"
        )

    # ---- base model
    started = time.perf_counter()
    if isinstance(base, tuple):
        base_model, tokenizer = base
        base_name = getattr(getattr(base_model, "config", None), "_name_or_path", "") or "base"
    else:
        base_model, tokenizer = load_model(base, device=device)
        base_name = str(base)
    tick("load", started)
    probes = energy_mod.probe_names(base_model, matrix)
    case_matrix = probes[0]
    rotation_names = resolve_names(base_model, layers) if "rotation" in chosen else []
    fo_names = resolve_names(base_model, layers) if "first-order" in chosen else []

    results: dict[str, Any] = {
        "base": base_name,
        "tuned": dict(zip(labels, tuned)),
        "what": list(chosen),
        "datasets": {
            k: {"role": v["role"], "source": v["source"], "n": len(v["examples"])}
            for k, v in datasets.items()
        },
        "settings": {
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "layers": _selection_name(layers),
            "top_k": top_k,
            "energy_target": energy_target,
            "basis_method": basis_method,
            "max_length": max_length,
            "matrix": case_matrix,
            "probes": probes,
        },
    }

    # ---- base side
    if "energy" in chosen:
        started = time.perf_counter()
        ood = [k for k, v in datasets.items() if v["role"] == "ood"] or list(datasets)
        examples = [e for k in ood for e in datasets[k]["examples"]]
        log(f"energy: {len(probes)} matrix(es) on {len(examples)} prompt(s) of {', '.join(ood)}")
        report = energy_mod.energy_curves(
            base_model,
            tokenizer,
            examples,
            probes,
            target=energy_target,
            batch_size=batch_size,
            max_length=max_length,
        )
        results["energy"] = {**report.to_dict(points=256), "datasets": ood}
        tick("energy", started)
    base_subspaces = None
    if "rotation" in chosen:
        started = time.perf_counter()
        log(f"rotation: base top-{top_k} subspaces of {len(rotation_names)} matrices")
        base_subspaces = rot_mod.left_subspaces(base_model, rotation_names, top_k=top_k, method=basis_method)
        results["rotation"], results["rotation_rankwise"] = {}, {"matrix": case_matrix, "models": {}}
        tick("rotation", started)
    gradients = {}
    if "first-order" in chosen:
        started = time.perf_counter()
        for key, info in datasets.items():
            log(f"first-order: base gradients on {key}")
            gradients[key] = fo_mod.dataset_gradients(
                base_model,
                tokenizer,
                info["examples"],
                fo_names,
                batch_size=batch_size,
                max_length=max_length,
            )
        results["first_order"] = {}
        tick("first-order", started)
    states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in datasets}
    entropies: dict[str, dict[str, Any]] = {key: {} for key in datasets}

    def per_model_outputs(label: str, model) -> None:
        if "hidden" in chosen:
            started = time.perf_counter()
            for key, info in datasets.items():
                states[key][label] = hidden_mod.pooled_hidden_states(
                    model, tokenizer, info["examples"], batch_size=batch_size, max_length=max_length
                )
            tick("hidden", started)
        if "entropy" in chosen:
            started = time.perf_counter()
            for key, info in datasets.items():
                log(f"entropy: {label} on {key}")
                entropies[key][label] = entropy_mod.generation_entropy(
                    model,
                    tokenizer,
                    info["examples"],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    max_length=max_length,
                )
            tick("entropy", started)

    per_model_outputs("base", base_model)
    base_weights = {name: p for name, p in base_model.named_parameters(remove_duplicate=False)}

    # ---- tuned models, one at a time
    for label, path in zip(labels, tuned):
        started = time.perf_counter()
        log(f"loading {label}: {path}")
        model, _ = load_model(path, device=device)
        tick("load", started)
        if "rotation" in chosen:
            started = time.perf_counter()
            summary = rot_mod.rotation_summary(
                base_weights,
                model,
                rotation_names,
                top_k=top_k,
                method=basis_method,
                base_subspaces=base_subspaces,
            )
            results["rotation"][label] = summary
            tuned_weight = dict(model.named_parameters(remove_duplicate=False))[case_matrix]
            results["rotation_rankwise"]["models"][label] = rot_mod.rankwise_rotation(
                base_weights[case_matrix],
                tuned_weight,
                top_k=top_k,
                method=basis_method,
                ranks=rot_mod.rank_grid(rot_mod.rotation_rank(tuned_weight.shape, top_k), rank_points),
            )
            log(f"rotation: {label} mean {summary['mean_deg']:.4f} deg over {summary['n_matrices']} matrices")
            tick("rotation", started)
        if "first-order" in chosen:
            started = time.perf_counter()
            results["first_order"][label] = {
                key: {"role": datasets[key]["role"], **fo_mod.first_order_signal(grads, base_weights, model)}
                for key, grads in gradients.items()
            }
            tick("first-order", started)
        per_model_outputs(label, model)
        del model
        gc.collect()

    # ---- hidden drift and entropy summaries
    if "hidden" in chosen:
        results["hidden"] = {}
        for key, per_model in states.items():
            pca = hidden_mod.pca_2d(per_model)
            results["hidden"][key] = {
                "role": datasets[key]["role"],
                "distance": hidden_mod.centroid_drift(per_model),
                "pca_distance": pca["distance"],
                "pca": pca,
            }
    if "entropy" in chosen:
        results["entropy"] = {
            key: {label: {"role": datasets[key]["role"], **value} for label, value in per_model.items()}
            for key, per_model in entropies.items()
        }
    results["timings"] = timings

    # ---- figures
    figure_files: list[str] = []
    if figures and plots.available():
        started = time.perf_counter()
        roles = {k: v["role"] for k, v in datasets.items()}
        makers = [
            ("energy", "energy.png", lambda p: plots.plot_energy(results["energy"], p)),
            (
                "rotation",
                "rotation_layerwise.png",
                lambda p: plots.plot_rotation_layerwise(results["rotation"], p),
            ),
            (
                "rotation",
                "rotation_rankwise.png",
                lambda p: plots.plot_rotation_rankwise(
                    results["rotation_rankwise"]["models"], case_matrix, p
                ),
            ),
            (
                "first-order",
                "first_order.png",
                lambda p: plots.plot_first_order(results["first_order"], roles, p),
            ),
            (
                "hidden",
                "hidden_pca.png",
                lambda p: plots.plot_hidden_pca({k: v["pca"] for k, v in results["hidden"].items()}, p),
            ),
            ("entropy", "entropy_kde.png", lambda p: plots.plot_entropy(results["entropy"], p)),
        ]
        for diagnostic, filename, make in makers:
            if diagnostic in chosen:
                make(out_dir / filename)
                figure_files.append(filename)
        tick("figures", started)
    elif figures:
        results["figures_skipped"] = "matplotlib is not installed"
    results["figures"] = figure_files
    (out_dir / "diagnostics.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return results


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

"""PNG figures of the diagnostics (matplotlib, object-oriented Agg canvas: no pyplot, no global backend).

Every function takes the JSON-ready results and a path, and returns the path written. matplotlib is the
optional ``diagnostics`` extra (``pip install 'rpsft[diagnostics]'``), imported only here, when a figure is
drawn: :func:`available` says whether it is installed (without it the diagnostics still write their JSON),
and drawing without it raises :class:`MissingPlotExtra`, which names the extra.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BASE_COLOR = "black"


EXTRA = "diagnostics"
MISSING = f"matplotlib is not installed. Fix: pip install 'rpsft[{EXTRA}]' (or pass --no-figures)"


class MissingPlotExtra(ImportError):
    """A figure was asked for without matplotlib (the ``diagnostics`` extra)."""


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotExtra` naming the extra when matplotlib is not installed."""
    if not available():
        raise MissingPlotExtra(MISSING)


def _figure(n_panels: int = 1, *, width: float = 5.0, height: float = 3.6, ncols: int | None = None):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    out, i = {}, 0
    for label in labels:
        if label == "base":
            out[label] = BASE_COLOR
        else:
            out[label] = palette(i % 10)
            i += 1
    return out


def plot_energy(energy: Mapping[str, Any], path: str | Path) -> Path:
    """y(r) against x(r) = r^2/R^2 per probed matrix, with the target and the suggested rank."""
    fig, (ax,) = _figure(1, width=5.5)
    for name, curve in energy["matrices"].items():
        short = name.replace("model.", "").replace(".weight", "")
        x = [100 * v for v in curve["x"]]
        y = [100 * v for v in curve["y"]]
        (line,) = ax.plot(x, y, label=f"{short}: r={curve['suggested_rank']} / {curve['rank']}")
        r = curve["suggested_rank"]
        ax.plot(
            [100 * (r / curve["rank"]) ** 2],
            [100 * curve["energy_at_suggested"]],
            "o",
            color=line.get_color(),
        )
    ax.axhline(100 * energy["target"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("x(r) = r^2 / R^2 (% of the block)")
    ax.set_ylabel("y(r): gradient energy in top r x r block (%)")
    ax.set_title(f"Fisher-projected energy; suggested k = {energy['k_fraction']:.3f} of rank")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_per_layer(ax, per_layer: Mapping[str, Any], label: str, color) -> None:
    """One line of a per-layer value (layer index as a string key; negative keys and None values skipped)."""
    layers = sorted((int(k), v) for k, v in per_layer.items() if v is not None and int(k) >= 0)
    if layers:
        ax.plot(
            [x for x, _ in layers], [y for _, y in layers], marker="o", markersize=3, label=label, color=color
        )


def plot_rotation_layerwise(rotation: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Mean top-K left-subspace rotation per layer, one line per tuned model."""
    fig, (ax,) = _figure(1, width=6.5)
    colors = _colors(list(rotation))
    for label, summary in rotation.items():
        _plot_per_layer(ax, summary["per_layer"], label, colors[label])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean principal angle (deg)")
    top_k = next(iter(rotation.values()))["top_k"] if rotation else ""
    ax.set_title(f"U-space rotation of the top-{top_k} subspace (mean over types)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rotation_rankwise(rankwise: Mapping[str, Mapping[str, Any]], matrix: str, path: str | Path) -> Path:
    """Mean principal angle of the prefix-r subspaces of one matrix, one line per tuned model."""
    fig, (ax,) = _figure(1, width=6.0)
    colors = _colors(list(rankwise))
    for label, curve in rankwise.items():
        ax.plot(curve["ranks"], curve["mean_deg"], label=label, color=colors[label])
    ax.set_xlabel("prefix rank r")
    ax.set_ylabel("mean principal angle (deg)")
    ax.set_title(f"rankwise rotation: {matrix.replace('.weight', '')}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_first_order(
    first_order: Mapping[str, Mapping[str, Mapping[str, Any]]], roles: Mapping[str, str], path: str | Path
) -> Path:
    """Per-layer ``<g_W, dW>`` per dataset (one panel each), one line per tuned model."""
    datasets = list(next(iter(first_order.values())).keys()) if first_order else []
    fig, axes = _figure(max(len(datasets), 1), width=5.0)
    colors = _colors(list(first_order))
    for ax, dataset in zip(axes, datasets):
        for label, per_dataset in first_order.items():
            _plot_per_layer(ax, per_dataset[dataset]["per_layer"], label, colors[label])
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_title(f"{dataset} ({roles.get(dataset, '?').upper()})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("<g, W_tuned - W_base> (mean over types)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_hidden_pca(pca: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Per dataset: prompts in the 2-D PCA plane per model; arrows from the base centroid to each model's."""
    fig, axes = _figure(max(len(pca), 1), width=4.6, height=4.2)
    for ax, (dataset, picture) in zip(axes, pca.items()):
        colors = _colors(picture["labels"])
        for label in picture["labels"]:
            pts = picture["points"][label]
            ax.scatter(
                [p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.45, color=colors[label], label=label
            )
        base = picture["centroids"]["base"]
        for label in picture["labels"]:
            c = picture["centroids"][label]
            if label == "base":
                ax.plot([c[0]], [c[1]], marker="*", markersize=12, color=BASE_COLOR)
                continue
            ax.annotate(
                "",
                xy=(c[0], c[1]),
                xytext=(base[0], base[1]),
                arrowprops={"arrowstyle": "->", "color": colors[label], "linewidth": 1.8},
            )
        ev = picture["explained"]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
        ax.set_title(f"hidden drift: {dataset}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_entropy(entropy: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path) -> Path:
    """Per dataset: KDE of the per-prompt mean token entropy, one curve per model."""
    from rpsft.evaluation.diagnostics.entropy import kde

    fig, axes = _figure(max(len(entropy), 1), width=4.6)
    for ax, (dataset, per_model) in zip(axes, entropy.items()):
        colors = _colors(list(per_model))
        values = [v for result in per_model.values() for v in result["per_prompt"]]
        lo, hi = min(values), max(values)
        pad = max(0.25 * (hi - lo), 0.1)
        for label, result in per_model.items():
            grid, density = kde(
                result["per_prompt"], [lo - pad + i * (hi - lo + 2 * pad) / 199 for i in range(200)]
            )
            ax.plot(grid, density, label=f"{label} (mean {result['mean']:.2f})", color=colors[label])
        ax.set_xlabel("mean token entropy (nats)")
        ax.set_ylabel("density")
        ax.set_title(f"greedy-decoding entropy: {dataset}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)

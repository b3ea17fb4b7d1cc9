"""The reproduction study's outputs: figures (PNG) per study and ``docs/reproduction.md`` from the committed
``claims.json`` files, so one command regenerates the whole page from the stored results."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rpsft.dashboards.figures import RANK_SHARE_TITLE, share_of_rank_axis
from rpsft.dashboards.plot_style import plotly_go, styled

METHOD_COLORS = {
    "sft": "#d62728",
    "l2-init": "#9467bd",
    "lora": "#8c564b",
    "dft": "#e377c2",
    "iw": "#7f7f7f",
    "rpsft": "#1f77b4",
}


def _error(interval: dict[str, float], estimate: float) -> tuple[float, float]:
    return interval["high"] - estimate, estimate - interval["low"]


def short_label(label: str) -> str:
    """A configuration's label without what the figure's points share: ``[ref] rpsft k=32 lambda=100 layers=all
    step=16`` -> ``rpsft k=32 λ=100``."""
    text = re.sub(r"^\[ref\] | layers=all| step=\d+| \(\d+ seeds\)", "", label)
    return text.replace("lambda=", "\u03bb=").replace("learning_rate=", "lr=")


def configurations_by_phi(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's configurations by falling Phi at the study's beta: the order of the page's configuration
    table, whose row numbers label the trade-off figure's points."""
    key = f"phi@{result['beta']:g}"
    return sorted(result["configurations"], key=lambda c: -c["intervals"][key]["estimate"])


def tradeoff_figure(result: dict[str, Any]) -> Any:
    """G_id against F_ood with the paired bootstrap intervals as error bars, one colour per method, each point
    numbered as its row of the page's configuration table. Left: every configuration; right: those that gained
    on ID (G_id > 0), where the comparison is, at a scale of their own."""
    from plotly.subplots import make_subplots

    go = plotly_go()
    ordered = configurations_by_phi(result)
    number = {id(c): i for i, c in enumerate(ordered, start=1)}
    gained = [c for c in ordered if c["g_id"] > 0]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("every configuration", "the configurations with G_id > 0"),
        horizontal_spacing=0.08,
    )
    for col, shown in ((1, ordered), (2, gained)):
        by_method: dict[str, list[dict[str, Any]]] = {}
        for config in shown:
            by_method.setdefault(config["params"].get("method", "?"), []).append(config)
        for method, configs in by_method.items():
            gp, gm = zip(*(_error(c["intervals"]["g_id"], c["g_id"]) for c in configs))
            fp, fm = zip(*(_error(c["intervals"]["f_ood"], c["f_ood"]) for c in configs))
            fig.add_trace(
                go.Scatter(
                    x=[c["f_ood"] for c in configs],
                    y=[c["g_id"] for c in configs],
                    mode="markers+text",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    marker={"size": 9, "color": METHOD_COLORS.get(method)},
                    error_x={"type": "data", "array": list(fp), "arrayminus": list(fm), "thickness": 1},
                    error_y={"type": "data", "array": list(gp), "arrayminus": list(gm), "thickness": 1},
                    text=[str(number[id(c)]) for c in configs],
                    textposition="top right",
                    textfont={"size": 11, "color": METHOD_COLORS.get(method)},
                    hovertext=[f"{number[id(c)]}. {c['label']}" for c in configs],
                    hovertemplate="%{hovertext}<br>F_ood %{x:.4f}<br>G_id %{y:.4f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=[0],
                y=[0],
                mode="markers",
                name="base",
                legendgroup="base",
                showlegend=col == 1,
                marker={"symbol": "x", "size": 10, "color": "black"},
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="F_ood")
    fig.update_yaxes(title_text="G_id", row=1, col=1)
    title = f"{result['model']}: ID gain vs OOD forgetting (95% intervals; numbers: rows of the configuration table)"
    return styled(fig, title, "F_ood", "G_id")


def _rank_share(model: str, layers: str) -> Any:
    """``k -> the mean share of each protected matrix's rank`` for the study's model (its config alone): a k
    below 1 is a share already; an int rank is resolved per matrix. Without the model's config, ranks map to
    ``None``."""
    from rpsft.core.bases import mean_rank_fraction
    from rpsft.core.memory.dims import model_dims_for, protected_shapes

    try:
        shapes = list(protected_shapes(model_dims_for(model, local_files_only=True), layers).values())
    except Exception:  # noqa: BLE001  # not readable here: only the shares that are given are placed
        shapes = []

    def share(k: float) -> float | None:
        if k < 1.0:
            return k
        return mean_rank_fraction(int(k), shapes) if shapes else None

    return share


def phi_k_figure(result: dict[str, Any], claim: dict[str, Any]) -> Any:
    """Phi(k) on the k slice (C4) with 95% intervals, against the share of each protected matrix's rank that k
    protects on a log axis: full rank (L2-init) at 1, SFT (k = 0) as a band, ``k: auto`` marked."""
    go = plotly_go()
    numbers = claim["numbers"]
    beta = numbers.get("beta", 1)
    share = _rank_share(result["model"], numbers.get("layers", "all"))
    fig = go.Figure()

    def trace(rows: list[dict[str, Any]], name: str, **style: Any) -> Any:
        xs = [1.0 if not math.isfinite(r["k"]) else share(r["k"]) for r in rows]
        return go.Scatter(
            x=xs,
            y=[r["phi"]["estimate"] for r in rows],
            name=name,
            error_y={
                "type": "data",
                "array": [r["phi"]["high"] - r["phi"]["estimate"] for r in rows],
                "arrayminus": [r["phi"]["estimate"] - r["phi"]["low"] for r in rows],
            },
            text=[short_label(r["label"]) for r in rows],
            hovertext=[r["label"] for r in rows],
            hovertemplate="%{hovertext}<br>Phi %{y:.4f}<extra></extra>",
            **style,
        )

    rows = numbers.get("phi_by_k", [])
    sft = [r for r in rows if r["k"] == 0]
    ranked = [r for r in rows if r["k"] != 0]
    if ranked:
        fig.add_trace(
            trace(ranked, "RPSFT k (full rank: L2-init)", mode="lines+markers", marker={"size": 10})
        )
    if numbers.get("auto"):
        fig.add_trace(
            trace(
                numbers["auto"],
                "k: auto (energy rule)",
                mode="markers+text",
                textposition="top center",
                marker={"size": 14, "symbol": "star", "color": "#ff7f0e"},
            )
        )
    for row in sft:
        phi = row["phi"]
        fig.add_hrect(
            y0=phi["low"], y1=phi["high"], fillcolor=METHOD_COLORS["sft"], opacity=0.1, line_width=0
        )
        fig.add_hline(
            y=phi["estimate"],
            line={"dash": "dash", "color": METHOD_COLORS["sft"], "width": 1},
            annotation_text=f"{row['label']} (k = 0)",
            annotation_position="top left",
        )
    share_of_rank_axis(fig)
    return styled(
        fig,
        f"{result['model']}: Phi(k) at beta={beta:g} (bars, band: 95% intervals)",
        RANK_SHARE_TITLE,
        "Phi",
    )


REGIME_COLORS = {"loss": "#1f77b4", "decoupled": "#ff7f0e", "sgd": "#2ca02c"}


def drift_figure(result: dict[str, Any], claim: dict[str, Any]) -> Any:
    """Protected drift against lambda on log-log axes (C5), one line per regime (Adam with the penalty in the
    loss, Adam decoupled, SGD), with a 1/lambda guide through the paper regime's largest lambda."""
    go = plotly_go()
    numbers = claim["numbers"]
    # claims files from before the regimes hold one slice at the top level
    regimes = numbers.get("regimes") or {}
    if not regimes and numbers.get("lambda"):
        regimes = {"loss": {"lambda": numbers["lambda"], "drift_mean": numbers["drift_mean"]}}
    fig = go.Figure()
    for name, fit in regimes.items():
        fig.add_trace(
            go.Scatter(
                x=fit["lambda"],
                y=fit["drift_mean"],
                mode="lines+markers",
                name=fit.get("setting", name)
                + (f": slope {fit['slope_tail']:+.2f}" if "slope_tail" in fit else ""),
                line={"color": REGIME_COLORS.get(name)},
                text=fit.get("labels"),
            )
        )
    guide = regimes.get(numbers.get("paper_regime", "loss")) or next(iter(regimes.values()), None)
    if guide and guide["lambda"]:
        lam, drift = guide["lambda"], guide["drift_mean"]
        fig.add_trace(
            go.Scatter(
                x=lam,
                y=[drift[-1] * lam[-1] / x for x in lam],
                mode="lines",
                name="1/lambda",
                line={"dash": "dot", "color": "gray"},
            )
        )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return styled(
        fig, f"{result['model']}: protected drift vs lambda", "lambda", "||Uk^T (W - W0) Vk||_F (mean)"
    )


def rotation_figure(result: dict[str, Any]) -> Any:
    """Mean rotation of the top singular subspaces against the ID gain (C3)."""
    go = plotly_go()
    fig = go.Figure()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for config in result["configurations"]:
        if "rotation/mean_deg" in config["metrics"]:
            by_method.setdefault(config["params"].get("method", "?"), []).append(config)
    for method, configs in by_method.items():
        fig.add_trace(
            go.Scatter(
                x=[c["g_id"] for c in configs],
                y=[c["metrics"]["rotation/mean_deg"] for c in configs],
                mode="markers",
                name=method,
                marker={"size": 9, "color": METHOD_COLORS.get(method)},
                text=[c["label"] for c in configs],
                hovertemplate="%{text}<br>G_id %{x:.4f}<br>rotation %{y:.4g} deg<extra></extra>",
            )
        )
    return styled(fig, f"{result['model']}: rotation vs ID gain", "G_id", "mean principal angle (deg)")


def _has_rotation(result: dict[str, Any]) -> bool:
    return any("rotation/mean_deg" in config["metrics"] for config in result["configurations"])


def study_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The study's figures by name; the rotation figure only where the study measured rotation."""
    claims = {c["id"]: c for c in result["claims"]}
    figures = {
        "tradeoff": tradeoff_figure(result),
        "phi_k": phi_k_figure(result, claims["C4"]),
        "drift_lambda": drift_figure(result, claims["C5"]),
    }
    if _has_rotation(result):
        figures["rotation"] = rotation_figure(result)
    return figures


def write_study_figures(result: dict[str, Any], results_dir: str | Path) -> tuple[list[Path], str | None]:
    """The study's figures as PNG: ``(paths, None)``, or ``([], why not)``."""
    from rpsft.dashboards.report import write_pngs

    figures = study_figures(result)
    # a rerun without rotation leaves no earlier run's rotation figure for the page to embed
    if "rotation" not in figures:
        (Path(results_dir) / "rotation.png").unlink(missing_ok=True)
    return write_pngs(figures, Path(results_dir))


# ------------------------------------------------------------------------------------------ the page


def _fmt(interval: dict[str, float] | None) -> str:
    if not interval:
        return "-"
    return f"{interval['estimate']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def _configuration_table(result: dict[str, Any]) -> list[str]:
    beta = result["beta"]
    lines = [
        "**Every configuration** at its final checkpoint, on all scored items (selection and report; nothing is "
        "chosen from this table), with 95% paired bootstrap intervals.",
        "",
        f"| # | configuration | seeds | G_id | F_ood | Phi (beta={beta:g}) | drift | rotation (deg) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = f"phi@{beta:g}"
    for number, c in enumerate(configurations_by_phi(result), start=1):
        m = c["metrics"]
        rot = f"{m['rotation/mean_deg']:.4g}" if "rotation/mean_deg" in m else "-"
        drift = f"{m['drift_mean']:.4g}" if "drift_mean" in m else "-"
        lines.append(
            f"| {number} | {c['label']} | {c['n_seeds']} | {_fmt(c['intervals']['g_id'])} | {_fmt(c['intervals']['f_ood'])} "
            f"| {_fmt(c['intervals'][key])} | {drift} | {rot} |"
        )
    return lines


def _c2_section(result: dict[str, Any]) -> list[str]:
    """C2's family frontiers (``rpsft.sweeps.analysis.frontiers``): a family x beta table of each family's chosen configuration
    with its Phi on the report items, RPSFT's paired differences, and the paper-protocol comparison. Nothing for a
    claims file written before the frontiers (its C2 evidence says it all)."""
    claim = next((c for c in result.get("claims", []) if c.get("id") == "C2"), None)
    numbers = (claim or {}).get("numbers") or {}
    frontiers = numbers.get("frontiers")
    if not frontiers:
        return []
    betas = [f"{b:g}" for b in numbers.get("betas", [])]
    lines = [
        f"**C2 family frontiers** ({numbers.get('items', '')}): at each beta the family's configuration of "
        "largest Phi, with its Phi and 95% paired bootstrap interval.",
        "",
        "| family | " + " | ".join(f"beta={b}" for b in betas) + " |",
        "|---" * (len(betas) + 1) + "|",
    ]
    for name, per_beta in frontiers.items():
        cells = []
        for b in betas:
            point = per_beta.get(b)
            if point is None:
                cells.append("-")
                continue
            report = point["report"]
            phi = _fmt(report.get("phi_interval")) if report.get("phi_interval") else f"{report['phi']:+.4f}"
            cells.append(f"{phi} ({point['label']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, per_beta in numbers.get("differences", {}).items():
        lines.append(f"| rpsft - {name} | " + " | ".join(_fmt(per_beta.get(b)) for b in betas) + " |")
    paper = numbers.get("paper_protocol")
    if paper:
        chosen = ", ".join(f"{name}: {label or '-'}" for name, label in paper["configurations"].items())
        lines += [
            "",
            f"Paper protocol (final step, {paper['items']} items; {chosen}): **{paper['verdict']}**.",
        ]
        if paper["differences"]:
            lines += ["", "| paper protocol | " + " | ".join(f"beta={b}" for b in betas) + " |"]
            lines.append("|---" * (len(betas) + 1) + "|")
            for name, per_beta in paper["differences"].items():
                lines.append(f"| rpsft - {name} | " + " | ".join(_fmt(per_beta.get(b)) for b in betas) + " |")
    return lines + [""]


def _forgetting_section(result: dict[str, Any]) -> list[str]:
    """F_ood of every configuration under the nll and mc views, and where they disagree."""
    lines = ["### Forgetting under two views", ""]
    views = result.get("forgetting_views")
    if not views:
        return lines + ["Not in this result file (written before both views were reported).", ""]
    if not any(row["f_ood"].get("mc") for row in views["configurations"]):
        return lines + [
            "F_ood is under `nll` only: this study scored no `mc` items (`evaluation.mc` is not set).",
            "",
        ]
    lines += [
        "F_ood under `nll` (the rise in NLL of the base model's own answers) and `mc` (the drop in "
        "log-likelihood multiple-choice accuracy, `evaluation.mc`), with 95% paired bootstrap intervals.",
        "",
        "| configuration | F_ood nll | F_ood mc |",
        "|---|---|---|",
    ]
    for row in views["configurations"]:
        lines.append(f"| {row['label']} | {_fmt(row['f_ood'].get('nll'))} | {_fmt(row['f_ood'].get('mc'))} |")
    lines += ["", f"**Disagreements.** Rule: {views['rule']}. Found: {views['summary']}.", ""]
    return lines


def reproduction_markdown(results: list[dict[str, Any]], docs_dir: Path, intro: str = "") -> str:
    lines = [
        "# Reproduction of the RPSFT paper's claims",
        "",
        "This page is generated by `rpsft study` from the committed result files "
        + ", ".join(f"`{Path(r['_path']).relative_to(docs_dir.parent)}`" for r in results)
        + ". Each claim has our numbers with 95% paired bootstrap intervals (items resampled jointly for the base "
        "and every configuration, seeds resampled within a configuration) and a verdict: **reproduced**, "
        "**not reproduced** (the intervals exclude the claimed direction) or **inconclusive** (they allow both).",
        "",
    ]
    lines += [
        "**Scale.** These studies run the paper's comparison at the scale a 2-core CPU affords: the embedded "
        "135M / 270M models, trained on a fixed subset of CHAMP competition-math solutions (`champ:train`, never "
        "the scored items) for the steps or epochs each study's line below states (see "
        "[Choosing the training regime](regime.md)), and the loss-based trade-off: `G_id` is the drop in per-token "
        "NLL of the reference "
        "solutions of MATH-500, Minerva and OlympiadBench items, `F_ood` the rise in NLL of the base model's own "
        "greedy answers to GPQA, IFEval, MMLU-Pro, Safety and TruthfulQA-MC prompts (see "
        "`evaluation/loss_metrics.py`). The paper reports accuracies of 7-8B models after 12-20 epochs; a verdict "
        "here is about this scale, not a replication of the paper's tables.",
        "",
        "**Regenerate.** `rpsft study sweeps/configs/study-<model>.yaml` reruns a study (or resumes it, or reuses "
        "a finished one) and rewrites its `claims.json`, its figures and this page.",
        "",
    ]
    if intro:
        lines += [intro, ""]
    lines += [
        "## Claims",
        "",
        "| claim | " + " | ".join(r["model"] for r in results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    claim_ids = [c["id"] for c in results[0]["claims"]]
    texts = {c["id"]: c["claim"] for c in results[0]["claims"]}
    for cid in claim_ids:
        cells = []
        for r in results:
            claim = next((c for c in r["claims"] if c["id"] == cid), None)
            cells.append(f"**{claim['verdict']}**" if claim else "-")
        lines.append(f"| {cid}: {texts[cid].replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    for r in results:
        rel = Path(r["_path"]).parent.relative_to(docs_dir)
        lines += [
            "",
            f"## {r['model']}",
            "",
            f"Sweep `{r['sweep']}`: data `{r['data']}`; "
            + ", ".join(f"{k} {v}" for k, v in r["setup"].items())
            + ".",
            "",
        ]
        lines += [line for caveat in r.get("caveats", []) for line in (f"> **Caveat.** {caveat}", "")]
        for claim in r["claims"]:
            lines += [f"- **{claim['id']} ({claim['verdict']}).** {claim['claim']}. {claim['evidence']}."]
        lines += ["", *_c2_section(r), *(_configuration_table(r)), ""]
        for name, title in (
            ("tradeoff", "trade-off"),
            ("phi_k", "Phi(k)"),
            ("drift_lambda", "drift vs lambda"),
            ("rotation", "rotation vs ID gain"),
        ):
            if (Path(r["_path"]).parent / f"{name}.png").is_file():
                lines.append(f"![{r['model']} {title}]({rel}/{name}.png)")
        lines.append("")
        lines += _forgetting_section(r)
    return "\n".join(lines).rstrip() + "\n"


def write_reproduction_page(docs_dir: str | Path = "docs", intro: str = "") -> Path:
    """``docs/reproduction.md`` from every ``docs/results/*/claims.json``."""
    docs_dir = Path(docs_dir)
    results = []
    for path in sorted((docs_dir / "results").glob("*/claims.json")):
        result = json.loads(path.read_text())
        result["_path"] = str(path)
        results.append(result)
    if not results:
        from rpsft.core.errors import ConfigError

        raise ConfigError(
            f"docs: no study results (results/<model>/claims.json) under {docs_dir}. Fix: --docs the folder that "
            "holds the studies' results_dir (default: docs)"
        )
    page = docs_dir / "reproduction.md"
    page.write_text(reproduction_markdown(results, docs_dir, intro))
    return page

"""``rpsft report``: a self-contained HTML report of a sweep (plotly), its figures as PNGs, logged to MLflow.

The report reads the sweep's MLflow runs and nothing else, so its numbers are those in MLflow; the same numbers
are embedded as JSON (``<script id="rpsft-report-data">``) for other tools.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rpsft.dashboards.figures import report_figures
from rpsft.dashboards.sweep_data import SweepData
from rpsft.dashboards.tables import benchmark_rows, rl_rows, trial_rows
from rpsft.sweeps.analysis.summary import ITEMS_NAMES, PART_TITLES, trial_label

REPORT_HTML = "report.html"
ARTIFACT_DIR = "report"
FIGURE_TITLES = {
    "tradeoff": "ID gain vs OOD forgetting",
    "phi_vs_k": "Phi against k",
    "importance": "Parameter importance",
    "parallel": "Parallel coordinates of the searched trials",
    "training_curves": "Training curves",
    "trajectories": "Trajectories through the evaluations",
    "rotation": "Rotation",
    "rl_tradeoff": "Trade-off before and after RL",
}
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{padding:4px 10px;border-bottom:1px solid #eee}
th{background:#f6f6f6;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen{background:#fff6d6;font-weight:600} .meta{color:#555;font-size:14px} .muted{color:#888}
img.diag{max-width:48%;margin:6px;border:1px solid #eee} pre{background:#f8f8f8;padding:8px;overflow:auto}
"""


@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    png_error: str | None = None
    importances: dict[str, dict[str, float]] = field(default_factory=dict)


def figure_title(name: str) -> str:
    if name.startswith("contour_"):
        return f"Phi over (k, lambda), layers {name.removeprefix('contour_')}"
    return FIGURE_TITLES[name]


def _importance_table(importances: dict[str, dict[str, float]], evaluator: str) -> str:
    if not importances:
        return ""
    from rpsft.dashboards.importance import knobs_of

    knobs = knobs_of(importances)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in importances)
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f'<td class="num">{importances[t].get(k, 0.0):.2f}</td>' for t in importances)
        + "</tr>"
        for k in knobs
    )
    return (
        '<p class="meta">Share of each target\'s variation over the searched trials that each knob explains '
        f"(Optuna's {'fANOVA' if evaluator == 'fanova' else 'PED-ANOVA'}; references excluded).</p>"
        f'<table id="importance"><tr><th>knob</th>{head}</tr>{rows}</table>'
    )


def fmt(value: Any, spec: str = "+.4f") -> str:
    """How the report prints a number (``-`` for missing); tests compare MLflow values through it."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _table(
    rows: list[dict[str, Any]], columns: dict[str, str], table_id: str, chosen_key: str | None = None
) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title in columns.values())
    body = []
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key)
            css = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            cells.append(f'<td data-key="{html.escape(key)}"{css}>{html.escape(fmt(value))}</td>')
        chosen = ' class="chosen"' if chosen_key and row.get(chosen_key) else ""
        ident = html.escape(str(row.get("run_id") or row.get("metric") or ""))
        body.append(f'<tr data-id="{ident}"{chosen}>{"".join(cells)}</tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _trial_table(data: SweepData) -> str:
    columns = {"trial_id": "trial", "label": "knobs", "status": "status", "g_id": "G_id", "f_ood": "F_ood"}
    columns.update({f"phi@{b:g}": f"Phi (beta={b:g})" for b in data.config.objective.betas})
    columns.update({"train_loss": "train loss", "drift_mean": "drift (mean)"})
    if data.has_rotation:
        columns["rotation_deg"] = "rotation (deg)"
    columns["operating_point"] = "operating point"
    return _table(trial_rows(data), columns, "trials", chosen_key="operating_point")


def _benchmark_table(data: SweepData) -> str:
    columns = {
        "benchmark": "benchmark",
        "suite": "suite",
        "kind": "metric",
        "base": "base",
        "sft": "SFT",
        "operating_point": "operating point",
        "operating_point_minus_base": "op - base",
        "operating_point_minus_sft": "op - SFT",
        "sft_minus_base": "SFT - base",
    }
    return _table(benchmark_rows(data), columns, "benchmarks")


def _rl_html(data: SweepData) -> str:
    """The init -> RL section, when the sweep has finished RL runs."""
    if not data.rl:
        return ""
    columns = {
        "init": "initial checkpoint",
        "id_init": "ID G_id: init",
        "id_rl": "+RL",
        "id_delta": "change",
        "ood_init": "OOD F_ood: init",
        "ood_rl": "+RL",
        "ood_delta": "change",
        "phi_init": f"Phi (beta={data.beta:g}): init",
        "phi_rl": "+RL",
        "chosen_step": "RL step chosen",
        "reward_first": "reward: first step",
        "reward_last": "last step",
    }
    return (
        "<h2>Init &rarr; RL (DAPO)</h2>"
        '<p class="meta">Each RL run starts from a kept checkpoint of this sweep; its checkpoint is the one with the '
        "best ID score (G_id), as in the paper. G_id and F_ood are the sweep's loss-based numbers against the base "
        "model (G_id up is better, F_ood down is better).</p>" + _table(rl_rows(data), columns, "rl")
    )


def _selection_html(data: SweepData) -> str:
    if not data.selections:
        return '<p class="muted">No finished trial carries G_id and F_ood yet: nothing to select.</p>'
    items = []
    for beta, selection in data.selections.items():
        best = selection.best
        trial = data.by_run_id(best.run_id)
        label = trial_label(best.params) if trial else best.trial_id  # with step=N for a trajectory's point
        parts = selection.operating_point()
        rows = [
            f'<li data-part="{part}">{html.escape(PART_TITLES[numbers.items if part == "report" else part])}: '
            f"{_part_numbers(numbers, beta)}</li>"
            for part, numbers in parts.items()
            if part == "report" or numbers.items == "selection"  # on all items: one line says it all
        ]
        comparisons = "".join(
            f"<li>vs {html.escape(c.role)} ({html.escape(trial_label(c.other.params))}): Phi difference on "
            f"{html.escape(ITEMS_NAMES.get(c.items, c.items))} {html.escape(c.difference.text()) if c.difference else '-'}: "
            f"<b>{'distinguishable' if c.distinguishable else 'not distinguishable'}</b></li>"
            for c in selection.comparisons()
        )
        items.append(
            f"<li>beta = {beta:g}: <b>{html.escape(label)}</b> (trial {html.escape(best.trial_id)})"
            f"<ul>{''.join(rows)}{comparisons}</ul></li>"
        )
    path_items = []
    for interval in data.selections[data.beta].path:
        high = "inf" if math.isinf(interval.high) else f"{interval.high:.4g}"
        trial = data.by_run_id(interval.point.run_id)
        label = trial_label(interval.point.params) if trial else interval.point.trial_id
        path_items.append(f"<li>beta in [{interval.low:.4g}, {high}): {html.escape(label)}</li>")
    split = data.selections[data.beta].split()
    on = " on the selection items" if data.selections[data.beta].best.items == "selection" else ""
    return (
        f'<p class="meta" id="item-split">Items: {html.escape(split["text"])}.</p>'
        f"<ul>{''.join(items)}</ul><p>Choice as beta varies{on} (the upper envelope of G_id - beta F_ood):</p>"
        f"<ul>{''.join(path_items)}</ul>"
    )


def _part_numbers(numbers: Any, beta: float) -> str:
    """G_id, F_ood and Phi of one part of the items (``rpsft.sweeps.analysis.selection.PartNumbers``), with intervals."""
    i = numbers.intervals
    if i is None:
        return f"G_id {fmt(numbers.g_id)}, F_ood {fmt(numbers.f_ood)}, Phi {fmt(numbers.phi)}"
    return html.escape(
        f"G_id {i['g_id'].text()}, F_ood {i['f_ood'].text()}, Phi {i[f'phi@{beta:g}'].text()} "
        f"({i['g_id'].level:.0%} intervals)"
    )


def _diagnostics_html(diagnostics_dir: Path | None) -> tuple[str, list[Path]]:
    """Figures (and the summary table) of an ``rpsft diagnose`` output directory, embedded as images."""
    if diagnostics_dir is None:
        return "", []
    from rpsft.evaluation.diagnostics.run import format_table

    results = json.loads((diagnostics_dir / "diagnostics.json").read_text())
    figures = [
        diagnostics_dir / name for name in results.get("figures", []) if (diagnostics_dir / name).exists()
    ]
    images = "".join(
        f'<img class="diag" alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in figures
    )
    table = html.escape(format_table(results))
    return (
        f'<h2>Diagnostics (rpsft diagnose)</h2><p class="meta">{html.escape(str(diagnostics_dir))}</p>'
        f"<pre>{table}</pre><div>{images}</div>",
        figures,
    )


def report_data_json(
    data: SweepData, importances: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    """The numbers the report shows, as embedded JSON."""
    return {
        "importance": importances or {},
        "sweep": data.name,
        "tracking_uri": data.tracking_uri,
        "experiment_id": data.experiment_id,
        "parent_run_id": data.parent_run_id,
        "betas": data.config.objective.betas,
        "base_metrics": data.base_metrics,
        "trials": [
            {
                "run_id": t.run_id,
                "trial_id": t.trial_id,
                "label": t.label,
                "status": t.status,
                "metrics": t.metrics,
            }
            for t in data.trials
        ],
        "selections": {f"{b:g}": s.to_dict() for b, s in data.selections.items()},
        "benchmarks": benchmark_rows(data),
        "rl": rl_rows(data),
    }


def render_html(
    data: SweepData,
    figures: dict[str, Any],
    diagnostics: str = "",
    importances: dict[str, dict[str, float]] | None = None,
    evaluator: str = "ped-anova",
) -> str:
    """The report page; ``diagnostics`` is an HTML section (from :func:`_diagnostics_html`) appended at the end."""
    from plotly.offline import get_plotlyjs

    config = data.config
    sections = []
    for name, fig in figures.items():
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")
        extra = _importance_table(importances or {}, evaluator) if name == "importance" else ""
        sections.append(
            f'<h2>{figure_title(name)}</h2>{extra}<div class="figure" data-figure="{name}">{div}</div>'
        )
    chosen = data.operating_point
    finished = sum(t.finished for t in data.trials)
    payload = json.dumps(report_data_json(data, importances), default=str).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rpsft sweep {html.escape(data.name)}</title>
<style>{STYLE}</style><script>{get_plotlyjs()}</script></head>
<body>
<h1>Sweep <code>{html.escape(data.name)}</code></h1>
<p class="meta">model <code>{html.escape(config.model)}</code> &middot; data <code>{html.escape(config.data)}</code>
 &middot; objective {config.objective.mode} on {config.objective.metric}, betas {", ".join(f"{b:g}" for b in config.objective.betas)}
 &middot; {finished} of {len(data.trials)} trial runs finished
 &middot; generated {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>
<p class="meta">MLflow <code>{html.escape(data.tracking_uri)}</code>, experiment {html.escape(data.experiment_id)},
 parent run <code>{html.escape(data.parent_run_id)}</code></p>
<h2>Operating point</h2>
{f"<p>Chosen: <b>{html.escape(chosen.label)}</b></p>" if chosen else ""}
{_selection_html(data)}
{sections[0] if sections else ""}
<h2>Trials</h2>
<p class="meta">G_id: in-domain gain; F_ood: out-of-domain forgetting; Phi = G_id - beta F_ood (all against the base
model, on {config.objective.metric}; each trial on all its scored items, here and in the figures).</p>
{_trial_table(data)}
<h2>Per benchmark: base, SFT and the operating point</h2>
{_benchmark_table(data)}
{_rl_html(data)}
{"".join(sections[1:])}
{diagnostics}
<script type="application/json" id="rpsft-report-data">{payload}</script>
</body></html>
"""


def write_pngs(figures: dict[str, Any], out_dir: Path) -> tuple[list[Path], str | None]:
    """Each figure as ``<name>.png`` (kaleido, which drives a local Chrome/Chromium); on failure the reason."""
    import plotly.io as pio

    paths = [out_dir / f"{name}.png" for name in figures]
    try:
        pio.write_images(list(figures.values()), [str(p) for p in paths], width=1200, height=560, scale=1)
    except Exception as exc:  # kaleido needs a Chrome or Chromium: the HTML report does not
        first_line = (str(exc).strip().splitlines() or [""])[0]
        reason = (
            f"the PNG figures were not written: kaleido could not export them ({type(exc).__name__}: "
            f"{first_line}). Fix: install Chromium (`apt-get install chromium`, which scripts/setup.sh does "
            "as root) or Chrome (`plotly_get_chrome`), or pass --no-png"
        )
        return [], reason
    return paths, None


def build_report(
    data: SweepData,
    out_dir: str | Path,
    *,
    png: bool = True,
    diagnostics_dir: str | Path | None = None,
    importance: str = "ped-anova",
) -> ReportFiles:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diagnostics = Path(diagnostics_dir) if diagnostics_dir else None
    if diagnostics is not None and not (diagnostics / "diagnostics.json").is_file():
        raise FileNotFoundError(
            f"--diagnostics: {diagnostics} has no diagnostics.json. Fix: the --out directory of `rpsft diagnose`"
        )
    from rpsft.dashboards.importance import param_importances

    importances = param_importances(data, evaluator=importance)
    figures = report_figures(data, importances)
    diagnostics_section, diagnostics_pngs = _diagnostics_html(diagnostics)
    path = out / REPORT_HTML
    path.write_text(
        render_html(data, figures, diagnostics_section, importances, importance), encoding="utf-8"
    )
    files = ReportFiles(path, importances=importances)
    if png:
        files.pngs, files.png_error = write_pngs(figures, out)
    files.pngs += diagnostics_pngs
    return files


def log_report(data: SweepData, files: ReportFiles) -> str:
    """Log the report (HTML + PNGs) as artifacts of the sweep's MLflow parent run, under ``report/``, and the
    parameter importances as its metrics (``importance/<target>/<knob>``)."""
    from rpsft.dashboards.importance import importance_metrics
    from rpsft.sweeps.store import tracking

    client = tracking.client_for(data.tracking_uri)
    tracking.log_metrics(client, data.parent_run_id, importance_metrics(files.importances))
    client.log_artifact(data.parent_run_id, str(files.html), ARTIFACT_DIR)
    for png in files.pngs:
        client.log_artifact(data.parent_run_id, str(png), ARTIFACT_DIR)
    return f"runs:/{data.parent_run_id}/{ARTIFACT_DIR}/{REPORT_HTML}"

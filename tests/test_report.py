"""``rpsft report``: its numbers equal MLflow's, it is logged to the parent run, and it renders in Chromium;
the per-trial rotation a sweep logs with ``evaluation.rotation``."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from browser import artifacts_dir, browser_missing, check_png, open_page, screenshot
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a finished Ray sweep


class TableCells(HTMLParser):
    """``{table id: {row data-id: {cell data-key: text}}}`` of the report's tables."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, str]]] = {}
        self.table = self.row = self.key = None
        self.text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
            self.tables[self.table] = {}
        elif tag == "tr" and self.table and "data-id" in attrs:
            self.row = attrs["data-id"]
            self.tables[self.table][self.row] = {}
        elif tag == "td" and self.row is not None:
            self.key, self.text = attrs.get("data-key"), ""

    def handle_data(self, data):
        if self.key is not None:
            self.text += data

    def handle_endtag(self, tag):
        if tag == "td" and self.key is not None:
            self.tables[self.table][self.row][self.key] = self.text
            self.key = None
        elif tag == "tr":
            self.row = None
        elif tag == "table":
            self.table = None


@pytest.fixture(scope="module")
def report(finished_sweep):
    """The CLI's report of the finished sweep: ``(outcome, report dir, CLI output)``."""
    from rpsft.cli import app

    outcome, root = finished_sweep
    out = root / "report"
    result = CliRunner().invoke(
        app, ["sweep", "report", outcome.name, "--runs-dir", str(root / "sweeps"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return outcome, out, result.output


def mlflow_runs(outcome):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    runs = client.search_runs(
        [outcome.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    return client, runs


def shows(cell: str, value: float) -> bool:
    """The table cell prints ``value``: a signed decimal within half a unit of its last printed digit."""
    assert re.fullmatch(r"[+-]\d+\.\d+", cell), cell
    decimals = len(cell.partition(".")[2])
    return abs(float(cell) - value) <= 0.5 * 10**-decimals + 1e-12


def test_report_numbers_equal_mlflow(report):
    outcome, out, _ = report
    client, runs = mlflow_runs(outcome)
    text = (out / "report.html").read_text()
    embedded = json.loads(re.search(r'id="rpsft-report-data">(.*?)</script>', text, re.S).group(1))
    by_run = {t["run_id"]: t for t in embedded["trials"]}
    assert set(by_run) == {r.info.run_id for r in runs} and len(runs) == 4

    cells = TableCells()
    cells.feed(text)
    trials_table = cells.tables["trials"]
    for run in runs:
        metrics = run.data.metrics
        assert by_run[run.info.run_id]["metrics"] == metrics  # the embedded numbers are MLflow's, exactly
        row = trials_table[run.info.run_id]
        assert shows(row["g_id"], metrics["g_id"]) and shows(row["f_ood"], metrics["f_ood"])
        assert shows(row["phi@0.5"], metrics["g_id"] - 0.5 * metrics["f_ood"])
        chosen = run.data.tags.get("rpsft.operating_point") == "true"
        assert (row["operating_point"] == "yes") == chosen

    # per benchmark: the base column is the parent run's base/ metric, the SFT column the sft run's
    parent = client.get_run(outcome.parent_run_id).data.metrics
    sft = next(r for r in runs if r.data.tags.get("rpsft.reference") == "sft").data.metrics
    bench = cells.tables["benchmarks"]
    assert set(bench) == {"nll/id/math500", "nll/ood/gpqa", "nll/ood/truthfulqa_mc"}
    for name, row in bench.items():
        assert shows(row["base"], parent[f"base/{name}"])
        assert shows(row["sft"], sft[name])
        assert shows(row["sft_minus_base"], sft[name] - parent[f"base/{name}"])


def test_report_is_logged_to_the_parent_run_with_pngs(report):
    outcome, out, output = report
    client, _ = mlflow_runs(outcome)
    logged = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "report")}
    expected = {
        "report.html", "tradeoff.png", "phi_vs_k.png", "training_curves.png", "trajectories.png", "rotation.png"
    }  # fmt: skip
    assert expected <= logged, output
    for name in expected - {"report.html"}:
        check_png(out / name, min_bytes=5_000)


def test_report_renders_in_headless_chromium(report):
    if reason := browser_missing():
        pytest.skip(reason)
    outcome, out, _ = report
    shots = artifacts_dir(out)
    with open_page(out / "report.html", height=1400) as driver:
        from selenium.webdriver.support.ui import WebDriverWait

        rendered = (
            "return Array.from(document.querySelectorAll('div.figure')).map("
            "d => d.querySelectorAll('svg.main-svg .scatterlayer .trace').length)"
        )
        WebDriverWait(driver, 60).until(lambda d: (n := d.execute_script(rendered)) and all(n))
        traces = driver.execute_script(rendered)
        assert len(traces) == 5 and all(
            n > 0 for n in traces
        )  # trade-off, Phi(k), curves, trajectories, rotation
        title = driver.execute_script("return document.querySelector('h1').innerText")
        assert outcome.name in title
        screenshot(driver, shots / "report-top.png")
        driver.execute_script("document.querySelector('[data-figure=\"training_curves\"]').scrollIntoView()")
        screenshot(driver, shots / "report-curves.png")
    check_png(shots / "report-top.png")
    check_png(shots / "report-curves.png")


def test_trials_log_their_rotation_against_cached_base_subspaces(finished_sweep):
    """``evaluation.rotation``: every finished trial carries rotation metrics and a rotation.json whose
    per-matrix angles average to the logged mean; the cached base subspaces span the same space as an
    independent float64 SVD of the base weights."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    outcome, root = finished_sweep
    client, runs = mlflow_runs(outcome)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished
    for run in finished:
        metrics = run.data.metrics
        assert metrics["rotation/mean_deg"] > 0  # every trial trained all matrices
        path = MlflowClient(outcome.tracking_uri).download_artifacts(
            run.info.run_id, "rotation.json", str(root)
        )
        summary = json.loads(Path(path).read_text())
        per_matrix = list(summary["per_matrix"].values())
        assert summary["top_k"] == 16 and len(per_matrix) == summary["n_matrices"] > 0
        assert metrics["rotation/mean_deg"] == pytest.approx(sum(per_matrix) / len(per_matrix), rel=1e-9)

    cached = torch.load(Path(outcome.sweep_dir) / "rotation_base.pt")
    model_dir = json.loads((Path(outcome.sweep_dir) / "sweep.json").read_text())["context"]["config"]["model"]
    base = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    for name, u in cached.items():
        w = base[name].detach().double()
        u_ref = torch.linalg.svd(w, full_matrices=False).U[:, : u.shape[1]]
        projector_gap = (u.double() @ u.double().T - u_ref @ u_ref.T).abs().max()
        assert projector_gap < 1e-4, name


def test_report_embeds_rpsft_diagnose_figures(finished_sweep, tmp_path):
    from rpsft.evaluation.diagnostics.run import diagnose

    from rpsft.cli import app

    outcome, root = finished_sweep
    model = str(root / "tiny-llama")
    diagnostics = tmp_path / "diagnostics"
    diagnose(model, [model], what="rotation", top_k=16, out_dir=diagnostics, names=["same"])
    figures = json.loads((diagnostics / "diagnostics.json").read_text())["figures"]
    assert figures

    args = ["sweep", "report", outcome.name, "--runs-dir", str(root / "sweeps"), "--no-png", "--no-log"]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "out"), "--diagnostics", str(diagnostics)]
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report.html").read_text()
    for name in figures:
        encoded = base64.b64encode((diagnostics / name).read_bytes()).decode()
        assert f'alt="{Path(name).stem}" src="data:image/png;base64,{encoded}"' in text

    missing = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o2"), "--diagnostics", str(tmp_path)])
    assert missing.exit_code == 2 and "diagnostics.json" in missing.output


def test_report_without_chrome_writes_its_html_and_fails_saying_why(finished_sweep, tmp_path, monkeypatch):
    import plotly.io

    from rpsft.cli import app

    def no_chrome(*args, **kwargs):
        raise RuntimeError(
            "Kaleido requires Google Chrome to be installed.\n  File 'kaleido/_sync.py', line 3"
        )

    monkeypatch.setattr(plotly.io, "write_images", no_chrome)
    outcome, root = finished_sweep
    args = ["sweep", "report", outcome.name, "--runs-dir", str(root / "sweeps"), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--no-log"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (tmp_path / "report.html").is_file() and not list(tmp_path.glob("*.png"))
    assert result.output.count("the PNG figures were not written") == 1
    assert (
        "(RuntimeError: Kaleido requires Google Chrome to be installed.). Fix: install Chromium"
        in result.output
    )
    assert "line 3" not in result.output
    result = CliRunner().invoke(app, [*args, "--no-log", "--no-png"])  # not asked for: not an error
    assert result.exit_code == 0, result.output

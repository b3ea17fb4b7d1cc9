"""The finished sweep in the real MLflow UI, used the way a person would in headless Chromium.

A ``mlflow server`` runs on the sweep's SQLite store and artifact root. The browser opens the experiment's
runs table, expands the sweep's parent run, adds the ``g_id`` / ``f_ood`` / ``k`` / ``lambda`` columns, selects
the trial runs and compares them in a scatter plot (x = f_ood, y = g_id); then opens the chosen trial's page
and its ``result.json`` artifact. Every value the UI shows is checked against MLflow's Python client.
Screenshots go to ``$RPSFT_TEST_ARTIFACTS`` (else the test's ``tmp_path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from browser import artifacts_dir, browser_missing, check_png, open_page, page_text, screenshot, wait_for_text
from services import free_port, healthy, stop_process_group

MISSING = browser_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

TIMEOUT = 90  # seconds for anything the UI loads (a large JS bundle, on a busy 2-core machine)
PARENT_TAG = "mlflow.parentRunId"


# ----------------------------------------------------------------------------------------------- server


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        stop_process_group(proc.pid)
        proc.wait(10)


@pytest.fixture(scope="module")
def mlflow_ui(finished_sweep, tmp_path_factory):
    """``(base_url, outcome, client)``: a real ``mlflow server`` on the finished sweep's store."""
    from mlflow.tracking import MlflowClient

    outcome, root = finished_sweep
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    artifact_root = client.get_experiment(outcome.experiment_id).artifact_location
    expected_root = (
        Path(root) / "sweeps" / "mlartifacts"
    ).resolve()  # sweeps/runner.py: <output_dir>/mlartifacts
    assert artifact_root.startswith("file:"), artifact_root
    assert Path(url2pathname(urlparse(artifact_root).path)).resolve() == expected_root, artifact_root
    workdir = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    for _attempt in range(3):  # another process may take the free port first
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = workdir / f"server-{port}.log"
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", outcome.tracking_uri,
            "--default-artifact-root", artifact_root,
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not healthy(url):
            time.sleep(0.5)
        if proc.poll() is None and healthy(url):
            break
        _stop(proc)
        if "address already in use" not in log.read_text(errors="replace").lower():
            pytest.fail(f"mlflow server did not come up on {url}:\n{log.read_text(errors='replace')[-4000:]}")
    else:
        pytest.fail("mlflow server: no free port after 3 attempts")
    try:
        yield url, outcome, client
    finally:
        _stop(proc)


@pytest.fixture
def shots(tmp_path) -> Path:
    return artifacts_dir(tmp_path)


# ----------------------------------------------------------------------------------------------- UI helpers


def _wait(driver: Any, condition, message: str, timeout: float = TIMEOUT) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.3,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    try:
        return wait.until(condition)
    except Exception as exc:
        raise AssertionError(f"{message} (page {driver.current_url}):\n{page_text(driver)[:2000]}") from exc


def _css(driver: Any, selector: str, message: str, timeout: float = TIMEOUT, displayed: bool = True) -> Any:
    """The first (displayed) element matching ``selector``, waited for."""
    from selenium.webdriver.common.by import By

    def found(d):
        shown = [e for e in d.find_elements(By.CSS_SELECTOR, selector) if not displayed or e.is_displayed()]
        return shown[0] if shown else False

    return _wait(driver, found, message, timeout)


def _xpath(driver: Any, xpath: str, message: str, timeout: float = TIMEOUT) -> Any:
    from selenium.webdriver.common.by import By

    def found(d):
        shown = [e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()]
        return shown[0] if shown else False

    return _wait(driver, found, message, timeout)


def _click(driver: Any, element: Any) -> None:
    from selenium.common.exceptions import ElementClickInterceptedException

    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'nearest'});", element)
    try:
        element.click()
    except ElementClickInterceptedException:  # an overlay over the spot: click as the element itself
        driver.execute_script("arguments[0].click();", element)


def _text(element: Any) -> str:
    """The element's full text (cells truncate long values with an ellipsis, the DOM keeps them whole)."""
    return (element.get_attribute("textContent") or "").strip()


def _close_assistant(driver: Any) -> None:
    """Close the "MLflow Assistant" side panel that opens by itself on the first visit."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    if "MLflow Assistant" not in page_text(driver):
        return
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        try:
            if button.is_displayed():
                button.click()
        except WebDriverException:
            pass


def _model_training_layout(driver: Any) -> None:
    """Switch the sidebar from "GenAI" to "Model training" (the classic runs layout), when offered."""
    from selenium.webdriver.common.by import By

    toggles = [
        t
        for t in driver.find_elements(By.XPATH, "//*[text()[normalize-space()='Model training']]")
        if t.is_displayed()
    ]
    if toggles:
        _click(driver, toggles[0])


def _shows_number(shown: str, value: float) -> bool:
    """``shown`` is ``value`` as the UI prints numbers: in full (``0.3481221446528977``, ``1``) or rounded
    (``0.348``): equal within half a unit of its last digit."""
    try:
        number = Decimal(shown.strip().replace("\u2212", "-"))
    except InvalidOperation:
        return False
    if float(number) == value:
        return True
    half_unit = Decimal(1).scaleb(number.as_tuple().exponent) / 2
    return abs(Decimal(value) - number) <= half_unit


def _trial_runs(outcome: Any, client: Any) -> list[Any]:
    runs = [client.get_run(trial.run_id) for trial in outcome.trials]
    assert runs, "the finished sweep has no trial runs"
    for run in runs:
        assert run.data.tags.get(PARENT_TAG) == outcome.parent_run_id
        assert "g_id" in run.data.metrics and "f_ood" in run.data.metrics, run.data.metrics
    return runs


def _set_column(driver: Any, search: Any, name: str, header_id: str, shown: bool) -> None:
    """Tick (``shown``) or untick ``name`` in the open "Columns" selector (a tree of Attributes, Metrics,
    Parameters and Tags, filtered by the search box)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    header = f'.ag-header-cell[col-id="{header_id}"]'
    if bool(driver.find_elements(By.CSS_SELECTOR, header)) == shown:
        return
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(name)
    node = _xpath(
        driver,
        "//*[@data-testid='column-selector-tree']"
        f"//span[contains(@class, 'tree-title') and normalize-space()='{name}']",
        f"column {name!r} in the Columns selector",
    )
    _click(driver, node)
    _wait(
        driver,
        lambda d: bool(d.find_elements(By.CSS_SELECTOR, header)) == shown,
        f"the {name!r} column {'shown in' if shown else 'gone from'} the runs table",
    )


def _widen_column(driver: Any, col_id: str, pixels: int) -> None:
    """Drag the right edge of a column header, as a person widens a column to read long run names."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    handles = driver.find_elements(
        By.CSS_SELECTOR, f'.ag-header-cell[col-id="{col_id}"] .ag-header-cell-resize'
    )
    if not handles:
        return
    try:
        ActionChains(driver).click_and_hold(handles[0]).move_by_offset(pixels, 0).release().perform()
    except WebDriverException:  # cosmetic only
        pass


def _cell(driver: Any, run_id: str, col_id: str) -> str:
    cell = _css(
        driver,
        f'.ag-center-cols-container [row-id="{run_id}"] [col-id="{col_id}"]',
        f"the {col_id} cell of run {run_id}",
    )
    return _text(cell)


# ----------------------------------------------------------------------------------------------- tests


def test_runs_table_lists_the_sweep_and_compares_id_gain_with_ood_forgetting(mlflow_ui, shots):
    url, outcome, client = mlflow_ui
    from selenium.webdriver.common.keys import Keys

    runs = _trial_runs(outcome, client)
    parent = client.get_run(outcome.parent_run_id)
    parent_name = parent.info.run_name
    assert parent_name == outcome.name
    eid = outcome.experiment_id

    with open_page(f"{url}/#/experiments/{eid}/runs") as driver:
        link = _css(
            driver, f'a[href$="/runs/{outcome.parent_run_id}"]', "the sweep's parent run in the table"
        )
        assert _text(link) == parent_name
        _close_assistant(driver)
        _model_training_layout(driver)
        active = client.search_runs([eid], max_results=1000)  # the table's count: every active run
        wait_for_text(driver, f"{len(active)} matching runs", TIMEOUT)

        # the trials are nested under the sweep's run: expand it
        expand = _css(
            driver,
            f'[row-id="{outcome.parent_run_id}"] [col-id="attributes.`Run Name`"] button',
            "the expand button of the parent run",
        )
        _click(driver, expand)
        for run in runs:
            link = _css(driver, f'a[href$="/runs/{run.info.run_id}"]', f"trial run {run.info.run_name!r}")
            assert _text(link) == run.info.run_name

        # show the trade-off metrics and the knobs as columns (and drop three empty attribute columns)
        _click(driver, _xpath(driver, "//button[normalize-space()='Columns']", "the Columns button"))
        search = _css(driver, "input[placeholder='Search columns']", "the column search box")
        for name in ("Dataset", "Source", "Models"):
            _set_column(driver, search, name, f"attributes.`{name}`", shown=False)
        for name, kind in (("g_id", "metrics"), ("f_ood", "metrics"), ("k", "params"), ("lambda", "params")):
            _set_column(driver, search, name, f"{kind}.`{name}`", shown=True)
        search.send_keys(Keys.ESCAPE)  # closes the selector
        _widen_column(driver, "attributes.`Run Name`", 160)
        time.sleep(0.5)

        for run in runs:
            rid, metrics, params = run.info.run_id, run.data.metrics, run.data.params
            for name in ("g_id", "f_ood"):
                shown = _cell(driver, rid, f"metrics.`{name}`")
                assert _shows_number(shown, metrics[name]), (run.info.run_name, name, shown, metrics[name])
            for name in ("k", "lambda"):
                assert _cell(driver, rid, f"params.`{name}`") == params.get(name, "-"), (
                    run.info.run_name,
                    name,
                )
        assert _cell(driver, outcome.parent_run_id, "metrics.`g_id`") == "-"  # the sweep run has no G_id
        shot = screenshot(driver, shots / "mlflow-ui-experiment.png")

        # select the trial runs and compare them: scatter plot, x = f_ood (forgetting), y = g_id (gain)
        for run in runs:
            box = _css(
                driver,
                f'.ag-pinned-left-cols-container [row-id="{run.info.run_id}"] input.ag-checkbox-input',
                f"the selection checkbox of {run.info.run_name!r}",
                displayed=False,  # a transparent input over the drawn box
            )
            _click(driver, box)
        _click(driver, _css(driver, "[data-testid='runs-compare-button']", "the Compare button"))
        wait_for_text(driver, f"Comparing {len(runs)} Runs", TIMEOUT)
        _close_assistant(driver)
        body = wait_for_text(driver, [r.info.run_name for r in runs], TIMEOUT)
        assert "rpsft.operating_point" in body
        _click(
            driver,
            _xpath(driver, "//*[@role='tab' and normalize-space()='Scatter Plot']", "Scatter Plot tab"),
        )
        for selector, name in (("x-axis-selector", "f_ood"), ("y-axis-selector", "g_id")):
            _click(driver, _css(driver, f"#{selector}", f"the {selector}"))
            option = _xpath(driver, f"//*[@role='option' and normalize-space()='{name}']", f"option {name!r}")
            _click(driver, option)
            _wait(
                driver,
                lambda d, s=selector, n=name: d.find_element("id", s).get_attribute("value") == f"metric-{n}",
                f"{selector} set to {name}",
            )
        traces = _wait(
            driver,
            lambda d: d.execute_script(
                """
                const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.offsetParent);
                for (const g of plots) {
                  const xt = g.querySelector('.xtitle'), yt = g.querySelector('.ytitle');
                  if (xt && yt && xt.textContent === 'f_ood' && yt.textContent === 'g_id' && g.data)
                    return g.data.map(t => ({x: Array.from(t.x || []), y: Array.from(t.y || [])}));
                }
                return null;
                """
            ),
            "a scatter plot titled f_ood / g_id",
        )
        points = sorted((x, y) for trace in traces for x, y in zip(trace["x"], trace["y"]))
        expected = sorted((r.data.metrics["f_ood"], r.data.metrics["g_id"]) for r in runs)
        assert len(points) == len(expected), points
        for got, want in zip(points, expected):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (points, expected)
        time.sleep(1)  # let the plot finish drawing
        compare_shot = screenshot(driver, shots / "mlflow-ui-compare.png")

    check_png(shot)
    check_png(compare_shot)


def test_trial_page_shows_its_metrics_params_tags_and_artifacts(mlflow_ui, shots):
    url, outcome, client = mlflow_ui
    runs = _trial_runs(outcome, client)
    chosen = outcome.selection.best.run_id if outcome.selection else runs[0].info.run_id
    run = client.get_run(chosen)
    parent_name = client.get_run(outcome.parent_run_id).info.run_name
    eid = outcome.experiment_id

    with open_page(f"{url}/#/experiments/{eid}/runs/{chosen}?workflowType=machine_learning") as driver:
        body = wait_for_text(driver, [run.info.run_name, "Metrics (", "Parameters (", "Parent run"], TIMEOUT)
        _close_assistant(driver)
        assert f"Metrics ({len(run.data.metrics)})" in body
        assert f"Parameters ({len(run.data.params)})" in body

        def metric_value(name: str) -> str:
            cell = _xpath(
                driver,
                f"//*[@role='row'][*[@role='cell'][1]//a[normalize-space()='{name}']]/*[@role='cell'][2]",
                f"metric {name!r} in the Metrics table",
            )
            return _text(cell)

        def param_value(name: str) -> str:
            cell = _xpath(
                driver,
                f"//*[@role='row'][*[@role='cell'][1][not(.//a) and normalize-space()='{name}']]/*[@role='cell'][2]",
                f"parameter {name!r} in the Parameters table",
            )
            return _text(cell)

        for name in ("g_id", "f_ood", "phi", "objective"):
            if name in run.data.metrics:
                shown = metric_value(name)
                assert _shows_number(shown, run.data.metrics[name]), (name, shown, run.data.metrics[name])
        for name in ("method", "k", "lambda", "layers", "trial_id"):
            if name in run.data.params:
                assert param_value(name) == run.data.params[name], name

        parent_link = _css(driver, f'a[href*="/runs/{outcome.parent_run_id}"]', "the parent run link")
        assert _text(parent_link) == parent_name
        body = page_text(driver)
        for key in ("rpsft.sweep", "rpsft.role", "rpsft.trial_id"):
            assert key in body, key
        assert run.data.tags["rpsft.trial_id"] in body
        if outcome.selection:
            assert run.data.tags.get("rpsft.operating_point") == "true"
            assert "rpsft.operating_point" in body

        # the final trade-off numbers sit at the end of the Metrics table: bring them into view
        row = _xpath(driver, "//*[@role='row'][*[@role='cell'][1]//a[normalize-space()='g_id']]", "g_id row")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
        time.sleep(0.5)
        trial_shot = screenshot(driver, shots / "mlflow-ui-trial.png")

        # the trial's artifacts are served from the sweep's artifact root
        _click(
            driver, _xpath(driver, "//*[@role='tab' and normalize-space()='Artifacts']", "the Artifacts tab")
        )
        for name in ("result.json", "trial_config.json", "train_metrics.json"):
            _css(driver, f"[data-testid='artifact-tree-node'][artifact-name='{name}']", f"artifact {name}")
        _click(
            driver, _css(driver, "[data-testid='artifact-tree-node'][artifact-name='result.json']", "result")
        )
        g_line = json.dumps({"g_id": run.data.metrics["g_id"]})[1:-1]  # "g_id": 0.3458...
        wait_for_text(driver, g_line, TIMEOUT)
        artifact_shot = screenshot(driver, shots / "mlflow-ui-trial-artifacts.png")

    check_png(trial_shot)
    check_png(artifact_shot)


def test_the_printed_url_opens_the_trials_sorted_by_phi_with_the_tradeoff_columns(mlflow_ui, shots):
    """No clicks: the address `rpsft sweep run` prints opens this sweep's trials, best Phi first, with G_id,
    F_ood, Phi and its interval and the knobs as columns (a view stored as an experiment tag)."""
    from rpsft.sweeps.cli import mlflow_view_text
    from rpsft.sweeps.store.tracking import trials_view_url

    base_url, outcome, client = mlflow_ui
    url = trials_view_url(base_url, outcome.experiment_id, outcome.name)
    assert f"trials by Phi: {url}" in mlflow_view_text(base_url, outcome.experiment_id, outcome.name)
    trials = [t for t in outcome.trials if t.finished]
    assert len(trials) >= 3
    best_first = sorted(trials, key=lambda t: -t.metrics["phi"])
    with open_page(url, width=2600) as driver:  # wide enough that the grid renders the knob columns too
        text = wait_for_text(
            driver, ["g_id", "f_ood", "phi", "lambda", *[t.label[:12] for t in trials]], TIMEOUT
        )
        screenshot(driver, shots / "mlflow_trials_by_phi.png")
        for column in ("phi_at_1_lo", "phi_at_1_hi", "method", "layers"):
            assert column in text, column
        # every trial's Phi is on the page (as MLflow prints the stored float), in descending order
        positions = [text.find(repr(t.metrics["phi"])) for t in best_first]
        assert all(p >= 0 for p in positions), (positions, text[:3000])
        assert positions == sorted(positions), [(t.label, t.metrics["phi"]) for t in best_first]
        assert "Judges" not in text and "Prompts" not in text  # the model-training layout, not the GenAI one
        parent = client.get_run(outcome.parent_run_id).info.run_name
        assert parent not in text.split("\n")  # only the trials, not the sweep's parent run
    check_png(shots / "mlflow_trials_by_phi.png")
    # the parent run's table artifact: the same trials, best Phi first, with the interval and the knobs
    path = client.download_artifacts(outcome.parent_run_id, "trials_table.json", str(shots))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["run id"] for r in rows] == [t.run_id for t in best_first]
    for row, trial in zip(rows, best_first):
        assert (row["Phi"], row["G_id"]) == pytest.approx((trial.metrics["phi"], trial.metrics["g_id"]), abs=1e-9)
        assert row["Phi low"] <= row["Phi"] <= row["Phi high"] and row["trial"] == trial.label

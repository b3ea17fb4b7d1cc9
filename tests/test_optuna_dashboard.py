"""The live study view: optuna-dashboard, pointed at a finished sweep's Optuna storage, opened in headless
Chromium, lists the sweep's study and shows its trials."""

from __future__ import annotations

import subprocess
import sys

import pytest
from browser import artifacts_dir, browser_missing, open_page, screenshot, wait_for_text
from services import free_port, healthy, stop_process_group, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a finished Ray sweep, a server, a browser


def test_optuna_dashboard_shows_the_sweeps_trials(finished_sweep, tmp_path):
    if reason := browser_missing():
        pytest.skip(reason)
    import optuna

    outcome, _ = finished_sweep
    storage = f"sqlite:///{outcome.sweep_dir / 'optuna.db'}"
    study = optuna.load_study(study_name=outcome.name, storage=storage)
    n_trials = len(study.trials)
    assert n_trials == 2  # the sweep's searched trials (references are not Optuna trials)
    command = [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]  # its console script
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, storage, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_until(lambda: healthy(url, "/api/studies"), 60, f"optuna-dashboard did not answer on {url}")
        except TimeoutError as exc:
            pytest.fail(f"{exc}:\n{log.read_text()}")
        with open_page(f"{url}/dashboard/") as driver:
            wait_for_text(driver, outcome.name)
        with open_page(f"{url}/dashboard/studies/{study._study_id}/trials") as driver:
            text = wait_for_text(driver, f"{n_trials} Trials")
            for trial in study.trials:
                assert f"Trial {trial.number}" in text
            screenshot(driver, artifacts_dir(tmp_path) / "optuna_dashboard.png")
    finally:
        stop_process_group(proc.pid)

"""Helpers for the sweep tests: a tiny model on disk, sweep configs around it, PostgreSQL schemas."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from conftest import PAPER_DATA

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_available() -> bool:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def pg_schema() -> tuple[str, str]:
    """A fresh schema in the local PostgreSQL and a URL that uses it: ``(schema, url)``."""
    import sqlalchemy as sa

    schema = f"rpsft_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return schema, f"{PG_URL}?options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


def tiny_model_dir(root: Path, tokenizer) -> Path:
    from rpsft.core.models import tiny_model

    path = root / "tiny-llama"
    if not (path / "config.json").exists():
        model = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


BASE: dict[str, Any] = {
    "data": "demo-math:16",
    "train": {
        "max_length": 96,
        "batch_size": 2,
        "max_steps": 2,
        "learning_rate": 5.0e-3,
        "lr_scheduler": "constant",
    },
    "space": {"k": [4, 0.25], "lambda": {"low": 0.1, "high": 10.0, "log": True}, "layers": ["all", "attn"]},
    "references": ["sft", "l2-init"],
    "evaluation": {
        "data_dir": str(PAPER_DATA),
        "loss": {
            "n_id": 2,
            "n_ood": 2,
            "id_benchmarks": ["math500"],
            "ood_benchmarks": ["gpqa", "truthfulqa_mc"],
            "max_new_tokens": 6,
            "max_length": 512,
            "batch_size": 4,
        },
    },
    "objective": {"mode": "phi", "metric": "nll", "betas": [1.0, 0.5]},
    "search": {"num_trials": 3, "seed": 0},
    "resources": {"cpus": 1},
    "reuse_workers": True,  # tiny models: one worker for all trials keeps the suite short
}


def sweep_dict(name: str, model_dir: Path, root: Path, **overrides: Any) -> dict[str, Any]:
    """A small sweep over the tiny model; ``overrides`` replace top-level sections (dicts are merged)."""
    raw = copy.deepcopy(BASE)
    raw.update(
        name=name, model=str(model_dir), output_dir=str(root / "sweeps"), cache_dir=str(root / "cache")
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def fault_hooks(monkeypatch, hook: str = "Fault", **args: Any) -> list[dict[str, Any]]:
    """A sweep's ``hooks:`` that inject faults (``fault_hooks.<hook>`` with ``args``). The trials' Ray workers
    import the hook from this directory: it goes on ``PYTHONPATH`` (pytest puts it only on this process's
    ``sys.path``), which local workers inherit and the driver hands to a cluster's workers."""
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    return [{"path": f"fault_hooks:{hook}", "args": args}]


def run_quietly(raw: dict[str, Any]):
    """Run a sweep from a raw config dict without console output; returns its SweepOutcome."""
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import run_sweep

    return run_sweep(parse_sweep_config(raw), echo=lambda *a, **k: None, progress=False)


def rpsft(*args: str, **kwargs: Any) -> subprocess.Popen:
    """The ``rpsft`` CLI of this venv in a new session (offline), so a test can kill it and all it started."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "rpsft"), *args]
    return subprocess.Popen(cmd, cwd=kwargs.pop("cwd"), env=env, start_new_session=True, **kwargs)


def resume_cli(name: str, root: Path, timeout: float) -> str:
    """``rpsft sweep resume <name> --runs-dir <root>/sweeps`` to the end; asserts it succeeded and chose an operating
    point, and returns its output."""
    proc = rpsft(
        "sweep",
        "resume",
        name,
        "--runs-dir",
        str(root / "sweeps"),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    assert "operating point" in out
    return out


def log_trial_run(
    client, experiment_id, parent, trial_id, params, metrics, *, items=None, tags=None, status="FINISHED"
) -> str:
    """A sweep's trial run written straight to MLflow (no training): its params, metrics, tags and per-item
    scores (``item_scores.json``); returns its run id. Runs come back in start order."""
    import time

    from rpsft.sweeps.store import tracking

    run = client.create_run(
        experiment_id,
        tags={
            tracking.PARENT_TAG: parent,
            tracking.TAG_TRIAL: trial_id,
            tracking.TAG_ROLE: "trial",
            **(tags or {}),
        },
    )
    run_id = run.info.run_id
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, metrics)
    if items is not None:
        tracking.log_json_artifact(client, run_id, "item_scores.json", items)
    client.set_terminated(run_id, status=status)
    time.sleep(0.01)  # distinct start times
    return run_id

"""rpsft installs one import name, ``rpsft``: the built wheel's top-level names, ``rpsft --help`` from a fresh
virtual environment that holds only that wheel, and a user's own top-level ``sweeps`` package beside it."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from sweep_helpers import sweep_dict, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("rpsft", "rpsft_core", "evaluation", "sweeps", "dashboards")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, venv)``: rpsft built as a wheel and installed (``--no-deps``) into a fresh venv whose
    dependencies come from this environment's site-packages by a path entry (not its ``.pth`` files, so this
    checkout's editable install is not seen there)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(source)],
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    (wheel,) = root.glob("rpsft-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "rpsft_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return wheel, venv


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_the_wheel_installs_only_the_rpsft_import_name(wheel_venv, tmp_path):
    wheel, venv = wheel_venv
    names = {Path(n).parts[0] for n in zipfile.ZipFile(wheel).namelist()}
    top_level = {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data"))}
    assert top_level == {"rpsft"}
    packaged = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("rpsft_core", "evaluation", "sweeps", "dashboards"):  # every module of every folder ships
        for module in (REPO / folder).rglob("*.py"):
            inner = module.relative_to(REPO / folder).as_posix()
            target = {"rpsft_core": "core"}.get(folder, folder)
            assert f"rpsft/{target}/{inner}" in packaged, f"{module} is missing from the wheel"
    assert "rpsft/sweeps/configs/demo.yaml" in packaged

    help_text = _run([str(venv / "bin" / "rpsft"), "--help"], cwd=tmp_path, env=_clean_env()).stdout
    for command in ("train", "eval", "sweep", "export", "rl", "regress", "study"):
        assert command in help_text
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import rpsft.sweeps.runner as m; print(m.__file__)"],
        cwd=tmp_path,
        env=_clean_env(),
    ).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout


@pytest.mark.slow
@pytest.mark.integration
def test_a_users_own_sweeps_package_and_rpsft_both_import_and_a_sweep_runs(
    wheel_venv, tmp_path, smol_tokenizer
):
    _, venv = wheel_venv
    theirs = tmp_path / "theirs"
    (theirs / "sweeps").mkdir(parents=True)
    (theirs / "sweeps" / "__init__.py").write_text("OWNER = 'theirs'\n")
    (theirs / "evaluation.py").write_text("OWNER = 'theirs'\n")
    env = _clean_env(PYTHONPATH=str(theirs))
    both = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sweeps, evaluation, rpsft.sweeps.runner, rpsft.evaluation.metrics; "
            "print(sweeps.OWNER, evaluation.OWNER, rpsft.sweeps.runner.__name__)",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert both == ["theirs", "theirs", "rpsft.sweeps.runner"]

    model = tiny_model_dir(tmp_path, smol_tokenizer)
    raw = sweep_dict("namespace", model, tmp_path, search={"num_trials": 0, "seed": 0}, references=["sft"])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    _run([str(venv / "bin" / "rpsft"), "sweep", "run", str(config)], cwd=tmp_path, env=env, timeout=900)
    out = _run(
        [str(venv / "bin" / "rpsft"), "sweep", "select", "namespace", "--runs-dir", str(tmp_path / "sweeps"), "--json"],
        cwd=tmp_path,
        env=env,
    ).stdout
    selection = json.loads(out[out.index("{") :])
    assert selection["best"]["trial_id"]
    assert [p["params"]["method"] for p in selection["ranking"]] == ["sft"]

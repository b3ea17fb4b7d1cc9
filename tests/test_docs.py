"""The README is a short front door whose links resolve, and the docs site builds strictly, with the CLI and
configuration references generated from the code (``docs/hooks/reference.py``) covering every command and field."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).with_name("mkdocs")


@cache
def reference_hook():
    spec = importlib.util.spec_from_file_location("rpsft_docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def generated(page: str) -> str:
    """A docs page's Markdown as the build renders it (placeholders filled)."""
    return reference_hook().fill((DOCS / page).read_text())


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move details to docs/"
    text = "\n".join(lines)
    # the exact test command CI and users run
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in text
    assert "bash scripts/setup.sh && .venv/bin/rpsft sweep run sweeps/configs/demo.yaml" in text


def test_readme_relative_links_resolve():
    text = README.read_text()
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links no docs page"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_mkdocs_build_is_strict_clean(tmp_path):
    if not MKDOCS.exists():
        pytest.skip("mkdocs is not installed (the dev extra)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "rpsft sweep run" in cli and "<!-- rpsft:" not in cli


def test_every_command_is_in_the_cli_reference():
    hook = reference_hook()
    page = generated("reference/cli.md")
    paths = [path for path, _, _ in hook.cli_commands()]
    assert {"rpsft train", "rpsft eval", "rpsft sweep run", "rpsft sweep select", "rpsft study"} <= set(paths)
    for path in paths:
        assert re.search(rf"^#+ `{re.escape(path)}`$", page, re.M), (
            f"{path} is missing from the CLI reference"
        )
    # every visible option of every command is in its table
    for path, command, _ in hook.cli_commands():
        for param in command.params:
            if not getattr(param, "hidden", False) and param.name != "help" and param.opts[0].startswith("-"):
                assert f"`{param.opts[0]}" in page, (
                    f"{path} {param.opts[0]} is missing from the CLI reference"
                )


def test_every_training_field_is_in_the_config_reference():
    from rpsft.core.config import TrainConfig

    page = generated("reference/config.md")
    section = page.split("### TrainConfig", 1)[1].split("\n### ", 1)[0]
    for name, field in TrainConfig.model_fields.items():
        key = field.alias or name
        assert f"| `{key}` |" in section, f"TrainConfig.{key} is missing from the configuration reference"
    from rpsft.sweeps.config.sweep import SweepConfig

    for name, field in SweepConfig.model_fields.items():
        assert f"| `{field.alias or name}` |" in page.split("### SweepConfig", 1)[1]


def test_every_placeholder_is_filled():
    placeholder = re.compile(
        r"^<!--\s*rpsft:.*-->\s*$", re.M
    )  # a line of its own (not one quoted in the text)
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        if placeholder.search(page.read_text()):
            left = placeholder.findall(generated(rel))
            assert not left, f"{rel}: placeholders the hook does not know: {left}"

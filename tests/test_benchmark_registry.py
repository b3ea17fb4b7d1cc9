"""The built-in benchmarks are data: one YAML file each under ``evaluation/builtin/``, read by the loader that reads a
user's entries, so adding a benchmark means adding a file."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import PAPER_DATA
from rpsft.evaluation.benchmarks import BUILTIN_DIR, Benchmark, builtin_registry, load_benchmark_entries
from rpsft.evaluation.settings import EvalSettings, plan_evaluation

# The paper's benchmarks (PAPER_NOTES: ID math with k = 16 / 4 / 8, OOD with k = 4), and two extras run when named.
PAPER_ID = {"aime24": 16, "aime25": 16, "amc23": 16, "math500": 4, "minerva": 8, "olympiadbench": 4}
PAPER_OOD = {"gpqa": 4, "ifeval": 4, "mmlu_pro": 4, "supergpqa": 4, "safety": 4, "truthfulqa_mc": 4}
EXTRAS = {"arc_c", "commonsenseqa"}


def test_every_builtin_file_is_one_registry_entry_with_the_papers_k():
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    registry = builtin_registry()
    assert [f.stem for f in files] == sorted(registry)
    for file in files:  # each file parsed independently of the loader
        assert Benchmark.model_validate(yaml.safe_load(file.read_text())) == registry[file.stem]
    assert {n: b.k for n, b in registry.items() if b.suite == "id"} == PAPER_ID
    assert {n: b.k for n, b in registry.items() if b.suite == "ood" and b.default} == PAPER_OOD
    assert {n for n, b in registry.items() if not b.default} == EXTRAS
    ids = [n for n, b in registry.items() if b.suite == "id"]
    assert list(registry)[: len(ids)] == ids  # the ID suite first


def test_adding_a_file_adds_a_benchmark(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    shutil.copy(BUILTIN_DIR / "math500.yaml", folder / "math500.yaml")
    (folder / "math500_twin.yaml").write_text(
        (BUILTIN_DIR / "math500.yaml").read_text().replace("name: math500", "name: math500_twin")
    )
    loaded = {b.name for b in load_benchmark_entries(folder)}
    assert loaded == {"math500", "math500_twin"}
    if not PAPER_DATA.is_dir():
        pytest.skip("shared/paper-data is not present")
    plan = plan_evaluation(
        EvalSettings(
            suite=["math500", "math500_twin"], data_dir=str(PAPER_DATA), benchmarks_file=str(folder), limit=2
        )
    )
    twin, original = plan.task("math500_twin"), plan.task("math500")
    assert [i.user for i in twin.items] == [i.user for i in original.items] and twin.n_samples == 4

"""`rpsft eval` end to end on the embedded SmolLM2-135M-Instruct over every benchmark in shared/paper-data, and
lm-eval's own `simple_evaluate` on the same task YAML, model and items giving the same numbers."""

import json
from pathlib import Path

import pytest
from rpsft.evaluation.benchmarks import builtin_registry
from typer.testing import CliRunner

PAPER_DATA = Path(__file__).resolve().parents[2] / "shared" / "paper-data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present"),
]

LIMIT, MAX_NEW_TOKENS, BATCH = 1, 6, 16


def paper_benchmarks() -> list[str]:
    """Registered benchmarks whose file is in paper-data; every full JSONL there must be one of them."""
    registry = builtin_registry()
    present = [b.name for b in registry.values() if b.file and (PAPER_DATA / b.file).is_file()]
    files = {str(p.relative_to(PAPER_DATA)) for p in PAPER_DATA.glob("*/*.jsonl")}
    covered = {b.file for b in registry.values()} | {b.test_file for b in registry.values()}
    assert files <= covered, f"paper-data files without a benchmark entry: {sorted(files - covered)}"
    return present


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, smol_model_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    extra = tmp / "synthetic_arith.jsonl"
    extra.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "What is 2+3? Answer in \\boxed{}."}],
                "reward_model": {"ground_truth": "5"},
            }
        )
        + "\n"
    )
    config = tmp / "eval-e2e.yaml"
    config.write_text(
        f"benchmarks:\n  - {{name: synthetic_arith, suite: id, scorer: math, file: {extra}, k: 2}}\n"
    )
    names = [*paper_benchmarks(), "synthetic_arith"]
    args = [
        "eval",
        "--model",
        "smollm2-135m-instruct",
        "--config",
        str(config),
        "--suite",
        ",".join(names),
        "--data-dir",
        str(PAPER_DATA),
        "--samples",
        "1",
        "--limit",
        str(LIMIT),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--batch-size",
        str(BATCH),
        "--cache-dir",
        str(tmp / "cache"),
        "--log-samples",
    ]
    from rpsft.cli import app

    out = tmp / "result.json"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    tasks_dir = tmp / "tasks"
    written = CliRunner().invoke(app, [*args, "--write-tasks", str(tasks_dir)])
    assert written.exit_code == 0, written.output
    return {
        "output": result.output,
        "json": json.loads(out.read_text()),
        "names": names,
        "tasks_dir": tasks_dir,
    }


def test_rpsft_eval_runs_every_paper_benchmark_end_to_end(cli_run):
    result = cli_run["json"]["result"]
    assert set(result["benchmarks"]) == set(cli_run["names"])
    registry = builtin_registry()
    for name, score in result["benchmarks"].items():
        assert score["n_items"] == LIMIT and score["n_samples"] == 1
        assert 0.0 <= score["avg_at_k"] <= 1.0 and score["pass_at_k"] == score["avg_at_k"]  # k = 1
        title = registry[name].title if name in registry else name
        assert title in cli_run["output"]
        responses = result["samples"][name][0]["responses"]
        assert len(responses) == 1 and isinstance(responses[0], str)
    assert "ID (macro)" in cli_run["output"] and "OOD (macro)" in cli_run["output"]
    ids = [s["avg_at_k"] for s in result["benchmarks"].values() if s["suite"] == "id"]
    assert result["suites"]["id"] == pytest.approx(sum(ids) / len(ids))


def test_lm_evals_own_simple_evaluate_gives_the_same_numbers(cli_run, smol_model_dir):
    """The written YAML through lm-eval's TaskManager(include_path) and its own HFLM loading the model from
    its directory: the same responses and scores as `rpsft eval` (greedy, same batch size)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = cli_run["json"]["result"]
    tasks = sorted(p.stem for p in Path(cli_run["tasks_dir"]).glob("rpsft_*.yaml"))
    assert tasks == sorted("rpsft_" + n for n in cli_run["names"])
    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": smol_model_dir, "dtype": "float32", "device": "cpu"},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(cli_run["tasks_dir"]), include_defaults=False),
        apply_chat_template=True,
        limit=LIMIT,
        batch_size=BATCH,
        log_samples=True,
        bootstrap_iters=0,
    )
    for name in cli_run["names"]:
        theirs = raw["results"]["rpsft_" + name]
        assert theirs["avg@k,all_repeats"] == ours["benchmarks"][name]["avg_at_k"], name
        assert theirs["pass@k,all_repeats"] == ours["benchmarks"][name]["pass_at_k"], name
        their_responses = [s["filtered_resps"][0] for s in raw["samples"]["rpsft_" + name]]
        our_responses = [s["responses"] for s in ours["samples"][name]]
        assert their_responses == our_responses, name

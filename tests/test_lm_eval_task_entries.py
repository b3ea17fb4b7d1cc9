"""Benchmarks that name an lm-eval task, proven offline with the task YAML that ships inside the installed lm-eval
(gsm8k: generative math; arc_challenge: multiple choice), with only their dataset pointed at local files in the
same schema: resolution to the task's own primary metric and filter, scores equal to ``lm_eval.simple_evaluate``
run directly, per-item scores that average to the score and feed the paired bootstrap, a sweep scored by them,
and the refusals (a hub dataset offline, a group, an unknown name, a metric that is not a mean)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import lm_eval
import pytest
import yaml
from helpers import scripted_lm
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.settings import EvalSettings, plan_evaluation

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
GSM8K_YAML = LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml"
ARC_YAML = LM_EVAL_TASKS / "arc" / "arc_challenge.yaml"
SEEDS = {
    "random_seed": 1234,
    "numpy_random_seed": 1234,
    "torch_random_seed": 1234,
    "fewshot_random_seed": 1234,
}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _gsm_row(a: int, b: int) -> dict:
    q = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
    return {"question": q, "answer": f"He has {a}+{b}={a + b} apples.\n#### {a + b}"}


ARC_ROWS = [
    ("Which animal is a mammal?", ["shark", "whale", "trout", "eel"], "B"),
    ("What do plants need for photosynthesis?", ["sound", "light", "salt", "sand"], "B"),
    ("Which of these is a planet?", ["Mars", "the Moon", "the Sun", "a comet"], "A"),
    ("At what temperature does water freeze?", ["100 C", "50 C", "0 C", "10 C"], "C"),
    ("Which is a metal?", ["wood", "glass", "iron", "paper"], "C"),
]


def _override(path: Path, include: Path, task: str, data_files: dict[str, str], **extra) -> Path:
    """A task YAML that includes lm-eval's registry file and overrides only the dataset (and ``extra``)."""
    config = {
        "include": str(include),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture()
def local_tasks(tmp_path) -> dict[str, Path]:
    """``{task name: task YAML}``: gsm8k and arc_challenge from lm-eval's registry, reading local JSONL."""
    gsm = [_gsm_row(a, b) for a, b in [(2, 3), (4, 5), (10, 7), (1, 1), (6, 2), (3, 9), (8, 8), (5, 5)]]
    arc = [
        {"id": f"q{i}", "question": q, "choices": {"text": opts, "label": list("ABCD")}, "answerKey": key}
        for i, (q, opts, key) in enumerate(ARC_ROWS)
    ]
    gsm_files = {
        "train": _jsonl(tmp_path / "gsm_train.jsonl", gsm[:5]),
        "test": _jsonl(tmp_path / "gsm_test.jsonl", gsm[5:] + gsm[:1]),
    }
    arc_files = {
        split: _jsonl(tmp_path / f"arc_{split}.jsonl", arc) for split in ("train", "validation", "test")
    }
    return {
        "gsm8k_local": _override(tmp_path / "gsm8k_local.yaml", GSM8K_YAML, "gsm8k_local", gsm_files),
        "arc_challenge_local": _override(
            tmp_path / "arc_local.yaml", ARC_YAML, "arc_challenge_local", arc_files
        ),
    }


def _settings(local_tasks: dict[str, Path], **kwargs) -> EvalSettings:
    entries = [
        {"suite": "id", "task": str(local_tasks["gsm8k_local"])},
        {"suite": "ood", "task": str(local_tasks["arc_challenge_local"])},
    ]
    return EvalSettings(suite=list(local_tasks), benchmarks=entries, **kwargs)


def test_task_entries_resolve_to_the_registry_files_primary_metric_and_first_filter(local_tasks):
    gsm_config = yaml.safe_load(GSM8K_YAML.read_text())  # read independently of lm-eval's loader
    arc_config = yaml.safe_load(
        (LM_EVAL_TASKS / "arc" / "arc_easy.yaml").read_text()
    )  # arc_challenge includes it
    plan = plan_evaluation(_settings(local_tasks, limit=2))
    gsm, arc = (t.harness for t in plan.tasks)
    assert [t.bench.name for t in plan.tasks] == ["gsm8k_local", "arc_challenge_local"]
    assert (gsm.name, gsm.metric, gsm.filter, gsm.output_type) == (
        "gsm8k_local",
        gsm_config["metric_list"][0]["metric"],
        gsm_config["filter_list"][0]["name"],
        gsm_config["output_type"],
    )
    assert (arc.name, arc.metric, arc.filter, arc.output_type) == (
        "arc_challenge_local",
        arc_config["metric_list"][0]["metric"],
        "none",
        arc_config["output_type"],
    )
    assert gsm.higher_is_better and arc.higher_is_better
    assert [t.n_total for t in plan.tasks] == [4, len(ARC_ROWS)] and [t.n_items for t in plan.tasks] == [2, 2]
    assert plan.task_names == []  # lm-eval's own tasks: rpsft writes no task YAML for them


def _gsm_scripted_lm(correct_for: set[str]):
    """An lm-eval LM that answers a gsm8k question in the strict ``#### N`` form, right for the questions in
    ``correct_for`` and wrong for the others."""

    def respond(doc, _):
        answer = int(doc["answer"].split("#### ")[-1])
        return f" Adding up. #### {answer if doc['question'] in correct_for else answer + 1}\n\nQuestion:"

    return scripted_lm(respond)


@pytest.mark.slow
def test_scores_equal_lm_eval_run_directly_and_items_average_to_them(local_tasks, smol_tokenizer):
    """Our score of each task equals ``lm_eval.simple_evaluate`` on the same task YAML, model and limit, so does
    lm-eval's standard error; the per-item scores average to the score."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from rpsft.core.models import tiny_model
    from rpsft.evaluation.runner import evaluate

    test_rows = (local_tasks["gsm8k_local"].parent / "gsm_test.jsonl").read_text().splitlines()
    questions = [json.loads(line)["question"] for line in test_rows]
    scripted = _gsm_scripted_lm({questions[0], questions[2]})
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=3)
    cases = [
        ("gsm8k_local", "exact_match", "strict-match", scripted, 4),
        (
            "arc_challenge_local",
            "acc",
            "none",
            HFLM(pretrained=model, tokenizer=smol_tokenizer, batch_size=4),
            5,
        ),
    ]
    for name, metric, filter_name, lm, limit in cases:
        settings = EvalSettings(
            suite=[name],
            benchmarks=[{"suite": "ood", "task": str(local_tasks[name])}],
            limit=limit,
            seed=1234,
        )
        result = evaluate(lm, None, settings)
        ours, items = result.benchmarks[name], result.items[name]
        direct = lm_eval.simple_evaluate(
            model=lm, tasks=[str(local_tasks[name])], task_manager=TaskManager(), limit=limit, **SEEDS
        )["results"][name]
        assert ours.avg_at_k == direct[f"{metric},{filter_name}"], name
        assert ours.stderr == pytest.approx(direct[f"{metric}_stderr,{filter_name}"]), name
        assert (ours.metric, ours.n_items, len(items)) == (metric, limit, limit)
        assert statistics.fmean(items) == pytest.approx(ours.avg_at_k)
    gsm_only = EvalSettings(
        suite=["gsm8k_local"], benchmarks=[{"suite": "id", "task": str(local_tasks["gsm8k_local"])}], limit=4
    )
    assert evaluate(scripted, None, gsm_only).items["gsm8k_local"] == [1.0, 0.0, 1.0, 0.0]  # right: 1st, 3rd


def test_a_lower_is_better_metric_is_negated_in_items_and_suite_scores(local_tasks, tmp_path):
    """``higher_is_better: false`` on the primary metric: the items and the suite score carry its negative, so a
    gain is positive for every benchmark; the reported score stays lm-eval's."""
    from rpsft.evaluation.harness_tasks import item_values
    from rpsft.evaluation.runner import BenchmarkScore

    flipped = _override(
        tmp_path / "arc_flipped.yaml",
        local_tasks["arc_challenge_local"],
        "arc_flipped",
        yaml.safe_load(local_tasks["arc_challenge_local"].read_text())["dataset_kwargs"]["data_files"],
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": False}],
    )
    plan = plan_evaluation(
        EvalSettings(suite=["arc_flipped"], benchmarks=[{"suite": "ood", "task": str(flipped)}])
    )
    task = plan.tasks[0].harness
    assert task.higher_is_better is False
    raw = {
        "samples": {
            "arc_flipped": [{"doc_id": i, "filter": "none", "acc": v} for i, v in enumerate([1, 0, 1])]
        }
    }
    assert item_values(raw, task) == [-1.0, -0.0, -1.0]
    score = BenchmarkScore(
        name="arc_flipped", title="", suite="ood", scorer="lm-eval", task="arc_flipped", n_items=3, n_samples=1,
        pass_k=1, avg_at_k=2 / 3, pass_at_k=2 / 3, metric="acc", higher_is_better=False,
    )  # fmt: skip
    assert score.oriented(score.avg_at_k) == pytest.approx(-2 / 3)


def test_a_registry_task_whose_dataset_is_on_the_hub_fails_offline_with_a_local_override_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = EvalSettings(suite=["arc_challenge"], benchmarks=[{"suite": "ood", "task": "arc_challenge"}])
    with pytest.raises(EvalConfigError) as refused:
        plan_evaluation(settings)
    message = str(refused.value)
    assert message.startswith("benchmarks[arc_challenge].task: lm-eval could not load task 'arc_challenge'")
    assert "HF_DATASETS_OFFLINE" in message and "include: " in message and "dataset_kwargs" in message
    assert "arc_challenge.yaml" in message  # the registry file to include


def test_the_cli_refuses_a_hub_task_offline_before_loading_a_model(monkeypatch, tmp_path):
    import rpsft.core.models
    from typer.testing import CliRunner

    from rpsft.cli import app

    monkeypatch.setattr(rpsft.core.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    entries = tmp_path / "tasks.yaml"
    entries.write_text("benchmarks:\n  - {suite: ood, task: arc_challenge}\n")
    result = CliRunner().invoke(
        app, ["eval", "--model", "m", "--benchmarks-file", str(entries), "--suite", "arc_challenge"]
    )
    assert result.exit_code == 2, result.output
    assert "could not load task 'arc_challenge'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("mmlu", "is an lm-eval group or tag, not one task"),
        ("ai2_arc", "is an lm-eval group or tag, not one task"),
        ("arc_challenj", "is not an lm-eval task. Close names: arc_challenge"),
        ("no/such/task.yaml", "does not exist"),
    ],
)
def test_groups_unknown_names_and_missing_files_are_refused_with_the_fix(task, expected):
    settings = EvalSettings(suite=["t"], benchmarks=[{"name": "t", "suite": "ood", "task": task}])
    with pytest.raises(EvalConfigError, match="Fix:") as refused:
        plan_evaluation(settings)
    assert expected in str(refused.value)


def test_a_metric_that_is_not_a_mean_of_items_is_refused(local_tasks, tmp_path):
    data_files = yaml.safe_load(local_tasks["arc_challenge_local"].read_text())["dataset_kwargs"][
        "data_files"
    ]
    f1 = _override(
        tmp_path / "arc_f1.yaml", ARC_YAML, "arc_f1", data_files,
        metric_list=[{"metric": "f1", "aggregation": "f1", "higher_is_better": True}],
    )  # fmt: skip
    with pytest.raises(EvalConfigError, match="is not a mean of per-item scores"):
        plan_evaluation(EvalSettings(suite=["arc_f1"], benchmarks=[{"suite": "ood", "task": str(f1)}]))


def test_a_task_directory_or_a_name_in_an_include_path(local_tasks, tmp_path):
    folder = tmp_path / "one_task"
    folder.mkdir()
    (folder / "arc.yaml").write_text(local_tasks["arc_challenge_local"].read_text())
    by_dir = plan_evaluation(
        EvalSettings(suite=["one_task"], benchmarks=[{"suite": "ood", "task": str(folder)}])
    ).tasks[0]
    by_name = plan_evaluation(
        EvalSettings(
            suite=["arc_challenge_local"],
            include_path=[str(folder)],
            benchmarks=[{"suite": "ood", "task": "arc_challenge_local"}],
        )
    ).tasks[0]
    assert by_dir.harness.name == by_name.harness.name == "arc_challenge_local"
    (folder / "gsm.yaml").write_text(local_tasks["gsm8k_local"].read_text())
    with pytest.raises(EvalConfigError, match="defines 2 tasks"):
        plan_evaluation(
            EvalSettings(
                suite=["one_task2"], benchmarks=[{"name": "one_task2", "suite": "ood", "task": str(folder)}]
            )
        )


def test_a_task_entry_takes_no_scorer_or_file():
    from rpsft.evaluation.benchmarks import parse_benchmark_entries

    with pytest.raises(EvalConfigError, match="cannot be set with 'task'"):
        parse_benchmark_entries([{"suite": "ood", "task": "arc_challenge", "scorer": "mc"}], "eval.yaml")
    with pytest.raises(EvalConfigError, match="needs 'scorer'"):
        parse_benchmark_entries([{"name": "x", "suite": "ood", "file": "x.jsonl"}], "eval.yaml")


@pytest.mark.slow
def test_a_sweep_scores_trials_by_task_entries_with_intervals_and_the_base_scored_once(
    local_tasks, tmp_path, smol_tokenizer, monkeypatch
):
    """``objective.metric: accuracy`` over lm-eval task entries: a trial's G_id / F_ood are the entries' score
    differences (computed here from the per-item scores), with paired bootstrap intervals, and the base model is
    scored once per sweep (its result cached by :meth:`TrialScorer.warm_base`)."""
    import torch
    from rpsft.core.models import tiny_model
    from rpsft.evaluation import scoring
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.trial.scoring import TrialScorer
    from sweep_helpers import sweep_dict, tiny_model_dir

    harness = {
        "suite": ["arc_challenge_local", "arc_as_id"],
        "benchmarks": [
            {"suite": "ood", "task": str(local_tasks["arc_challenge_local"])},
            {"name": "arc_as_id", "suite": "id", "task": str(local_tasks["arc_challenge_local"])},
        ],
        "limit": 5,
        "batch_size": 4,
    }
    raw = sweep_dict(
        "tasks", tiny_model_dir(tmp_path, smol_tokenizer), tmp_path,
        objective={"mode": "phi", "metric": "accuracy", "betas": [1.0]},
        evaluation={"harness": harness},
    )  # fmt: skip
    config = parse_sweep_config(raw)
    scorer = TrialScorer(config, base_key="tiny-base", cache_dir=str(tmp_path / "cache"))
    scorer.check()
    base = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    tuned = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.5 * torch.randn_like(p))
    scorer.warm_base(base, smol_tokenizer)
    scored = []
    original = scoring.evaluate
    monkeypatch.setattr(
        scoring, "evaluate", lambda model, *a, **k: scored.append(model) or original(model, *a, **k)
    )
    metrics, items, base_items = scorer.final_scores(tuned, smol_tokenizer, base)
    assert scored == [tuned]  # the base came from the cache
    ood, base_ood = items["ood_acc"]["arc_challenge_local"], base_items["ood_acc"]["arc_challenge_local"]
    idg, base_idg = items["id_acc"]["arc_as_id"], base_items["id_acc"]["arc_as_id"]
    assert len(ood) == len(base_ood) == 5 and all(w == 1 for _, w in ood)

    def mean(rows):
        return sum(v for v, _ in rows) / len(rows)

    assert metrics["acc/f_ood"] == pytest.approx(mean(base_ood) - mean(ood))
    assert metrics["acc/g_id"] == pytest.approx(mean(idg) - mean(base_idg))
    assert scorer.primary(metrics)["g_id"] == metrics["acc/g_id"]
    assert metrics["phi@1_lo"] <= metrics["acc/phi@1"] <= metrics["phi@1_hi"]


@pytest.mark.slow
def test_rpsft_eval_prints_the_tradeoff_of_task_entries_with_intervals(local_tasks, tmp_path, smol_tokenizer):
    """`rpsft eval --base` over a task entry: the JSON's G_id / F_ood are the differences of the per-item scores it
    holds, and their 95% intervals bracket them."""
    import torch
    from rpsft.core.models import tiny_model
    from typer.testing import CliRunner

    from rpsft.cli import app

    dirs = {}
    for name, noise in (("base", 0.0), ("tuned", 0.5)):
        model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])
        smol_tokenizer.save_pretrained(dirs[name])
    entries = tmp_path / "entries.yaml"
    entries.write_text(
        yaml.safe_dump({"benchmarks": [{"suite": "ood", "task": str(local_tasks["arc_challenge_local"])}]})
    )
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model",
        str(dirs["tuned"]),
        "--base",
        str(dirs["base"]),
        "--benchmarks-file",
        str(entries),
    ]
    args += [
        "--suite",
        "arc_challenge_local",
        "--limit",
        "5",
        "--beta",
        "1",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    tuned, base = (
        payload["result"]["items"]["arc_challenge_local"],
        payload["base"]["items"]["arc_challenge_local"],
    )
    f_ood = statistics.fmean(base) - statistics.fmean(tuned)
    assert payload["tradeoff"]["f_ood"] == pytest.approx(f_ood)
    interval = payload["intervals"]["f_ood"]
    assert interval["estimate"] == pytest.approx(f_ood) and interval["low"] <= f_ood <= interval["high"]
    assert "acc" in result.output and "95% paired bootstrap intervals" in result.output
    assert f"F_ood={f_ood:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]" in result.output


def test_the_loss_metrics_of_rpsft_eval_are_bounded_by_the_suite():
    from conftest import PAPER_DATA
    from rpsft.evaluation.cli import _loss_settings

    if not PAPER_DATA.is_dir():
        pytest.skip("shared/paper-data is not present")
    plan = plan_evaluation(EvalSettings(suite=["gpqa", "math500"], data_dir=str(PAPER_DATA), limit=3))
    loss = _loss_settings(plan.settings, plan)
    assert (loss.id_benchmarks, loss.ood_benchmarks, loss.n_id, loss.n_ood) == (["math500"], ["gpqa"], 3, 3)
    only_ood = plan_evaluation(EvalSettings(suite=["gpqa"], data_dir=str(PAPER_DATA), limit=3))
    assert _loss_settings(only_ood.settings, only_ood).id_benchmarks == []
    # a benchmark a config declares (or one that replaces a built-in) is not among the loss metrics' built-ins
    mine = {"name": "gpqa", "suite": "ood", "scorer": "mc", "file": "ood/gpqa_test.jsonl"}
    declared = plan_evaluation(
        EvalSettings(suite=["gpqa", "math500"], data_dir=str(PAPER_DATA), limit=3, benchmarks=[mine])
    )
    assert _loss_settings(declared.settings, declared).ood_benchmarks == []


def test_the_base_score_key_of_a_task_entry_follows_its_suite_name_yaml_and_data(local_tasks, tmp_path):
    """A cached base result is reused only for the same entry on the same task and data: moving the entry to
    another suite, renaming it, editing its task YAML or its local data each give another key."""
    from rpsft.evaluation.benchmarks import Benchmark
    from rpsft.evaluation.harness_tasks import resolve_task, task_source

    path = local_tasks["arc_challenge_local"]

    def key(**entry) -> str:
        return task_source(resolve_task(Benchmark(**{"suite": "ood", "task": str(path), **entry})))

    first = key()
    assert key() == first  # stable
    assert len({first, key(suite="id"), key(name="renamed")}) == 3
    path.write_text(path.read_text() + "num_fewshot: 1\n")
    edited = key()
    assert edited != first
    data = tmp_path / "arc_test.jsonl"
    data.write_text(
        data.read_text().replace("Which animal is a mammal?", "Which animal is a mammal, really?")
    )
    assert key() != edited


def test_a_lower_is_better_entry_enters_the_tradeoff_and_its_interval_with_one_sign():
    """F_ood from the suite scores and from the paired bootstrap of the items agree in sign and size when the
    OOD entry's metric is lower-is-better: the tuned model's higher raw value is forgetting."""
    from rpsft.evaluation.intervals import bootstrap_tradeoff
    from rpsft.evaluation.runner import BenchmarkScore, EvalResult
    from rpsft.evaluation.scoring import compute_tradeoff

    def result(raw: list[float]) -> EvalResult:
        score = BenchmarkScore(
            name="err", title="", suite="ood", scorer="lm-eval", task="err", n_items=len(raw), n_samples=1,
            pass_k=1, avg_at_k=statistics.fmean(raw), pass_at_k=statistics.fmean(raw), metric="error",
            higher_is_better=False,
        )  # fmt: skip
        return EvalResult(
            model="m", benchmarks={"err": score}, suites={"id": None, "ood": -score.avg_at_k},
            suites_pass={"id": None, "ood": -score.avg_at_k}, config_hash="h", items={"err": [-v for v in raw]},
        )  # fmt: skip

    base, tuned = result([0.1, 0.2, 0.3, 0.2]), result([0.3, 0.4, 0.3, 0.5])
    trade = compute_tradeoff(base, tuned, [1.0])
    assert trade.f_ood == pytest.approx(0.175)  # the error rose by 0.175: forgetting, positive
    draws = bootstrap_tradeoff(base.item_scores(), {"tuned": [tuned.item_scores()]}, draws=200)
    interval = draws.f_ood("tuned")
    assert interval.estimate == pytest.approx(0.175) and interval.low <= 0.175 <= interval.high


def test_a_sweep_refuses_the_vllm_backend_for_its_in_memory_trials(tmp_path, smol_tokenizer):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.trial.scoring import TrialScorer
    from sweep_helpers import sweep_dict, tiny_model_dir

    raw = sweep_dict(
        "v", tiny_model_dir(tmp_path, smol_tokenizer), tmp_path, evaluation={"harness": {"backend": "vllm"}}
    )
    scorer = TrialScorer(parse_sweep_config(raw), base_key="b", cache_dir=str(tmp_path / "c"))
    with pytest.raises(
        SweepConfigError, match="evaluation.harness.backend: vllm .* Fix: backend: auto or hf"
    ):
        scorer.check()


def test_a_sweep_hands_its_trials_and_its_nodes_absolute_input_paths(local_tasks, tmp_path, smol_tokenizer, monkeypatch):
    """Ray runs trials in their own directories: a task YAML or include path given relative to the working
    directory reaches them absolute, and a registry name stays a name."""
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import absolutize
    from rpsft.sweeps.shared_storage import node_inputs
    from sweep_helpers import sweep_dict, tiny_model_dir

    monkeypatch.chdir(tmp_path)
    harness = {
        "suite": ["arc_challenge_local", "arc_challenge"],
        "include_path": ["."],
        "benchmarks": [
            {"suite": "ood", "task": local_tasks["arc_challenge_local"].name},
            {"suite": "ood", "task": "arc_challenge"},
        ],
    }
    raw = sweep_dict(
        "abs", tiny_model_dir(tmp_path, smol_tokenizer), tmp_path, evaluation={"harness": harness}
    )
    config = absolutize(parse_sweep_config(raw))
    settings = config.evaluation.harness
    assert settings.include_path == [str(tmp_path)]
    assert [b.task for b in settings.benchmarks] == [str(local_tasks["arc_challenge_local"]), "arc_challenge"]
    assert [b.name for b in settings.benchmarks] == ["arc_challenge_local", "arc_challenge"]
    # the same fields are the inputs every node of a cluster must see (a registry name is not a path)
    inputs = node_inputs(config)
    assert inputs["evaluation.harness.include_path[0]"] == str(tmp_path)
    assert inputs["evaluation.harness.benchmarks[0].task"] == str(local_tasks["arc_challenge_local"])
    assert "evaluation.harness.benchmarks[1].task" not in inputs
    assert inputs["model"] == config.model and inputs["evaluation.data_dir"] == config.evaluation.data_dir

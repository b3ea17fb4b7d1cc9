"""A benchmark file in the avg@n form (N problems x n identical rows) is N items sampled n times: counted,
limited, sampled and bootstrapped as N items; settings that contradict the file are refused. Rows that repeat an
earlier row unevenly (duplicates, as in the paper's Safety file) are scored once; rows with the same prompt but
another reference stay separate items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import scripted_lm
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.settings import EvalSettings, plan_evaluation

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEMS = [("What is 2+3?", "5"), ("What is 7*6?", "42"), ("What is 10-4?", "6")]


def _row(question: str, answer: str) -> dict:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"prompt": prompt, "reward_model": {"ground_truth": answer}}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def repeated(tmp_path) -> Path:
    """3 problems x 4 identical rows, interleaved as such files often are (problem-major would work the same)."""
    _write(tmp_path / "data" / "rep.jsonl", [_row(q, a) for _ in range(4) for q, a in PROBLEMS])
    return tmp_path / "data"


def _settings(data_dir: Path, **kwargs) -> EvalSettings:
    entry = {"name": "rep", "suite": "id", "scorer": "math", "file": "rep.jsonl", **kwargs.pop("entry", {})}
    return EvalSettings(suite=["rep"], data_dir=str(data_dir), benchmarks=[entry], **kwargs)


def test_identical_rows_are_one_item_sampled_once_per_row(repeated):
    plan = plan_evaluation(_settings(repeated))
    (task,) = plan.tasks
    assert (task.n_total, task.n_samples, task.pass_k) == (3, 4, 4)
    assert [item.user for item in task.items] == [q for q, _ in PROBLEMS]  # in order of first appearance
    assert [item.repeats for item in task.items] == [4, 4, 4] and [i.index for i in task.items] == [0, 1, 2]
    limited = plan_evaluation(_settings(repeated, limit=40)).tasks[0]
    assert len(limited.items) == 3  # --limit counts distinct problems, not rows
    assert plan_evaluation(_settings(repeated, pass_k=2)).tasks[0].pass_k == 2  # pass@k per unique item


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"k": 2}, "k (--samples): 2 samples per item conflicts"),
        ({"entry": {"k": 8}}, "benchmarks[rep].k: 8"),
    ],
)
def test_a_sample_count_that_contradicts_the_file_is_refused(repeated, settings, field):
    with pytest.raises(EvalConfigError) as refused:
        plan_evaluation(_settings(repeated, **settings))
    assert field in str(refused.value) and "repeats each prompt 4 times" in str(refused.value)
    assert "Fix:" in str(refused.value)
    assert plan_evaluation(_settings(repeated, k=4)).tasks[0].n_samples == 4  # agreeing is fine


def test_uneven_repeats_are_duplicates_scored_once_and_other_references_stay_apart(tmp_path):
    rows = [_row(*PROBLEMS[0])] * 2 + [_row(*PROBLEMS[1])] * 3 + [_row("What is 2+3?", "6")]
    data = _write(tmp_path / "a" / "rep.jsonl", rows).parent
    (task,) = plan_evaluation(_settings(data)).tasks
    assert [(i.user, json.loads(i.ground_truth), i.repeats) for i in task.items] == [
        ("What is 2+3?", "5", 2),
        ("What is 7*6?", "42", 3),
        ("What is 2+3?", "6", 1),  # the same prompt with another reference: its own item
    ]
    assert task.n_samples == 4 and task.n_rows == 6  # the default k, not the repeat counts
    assert task.repeats_note() == "rep: 3 of 6 rows repeat an earlier row and are scored once: 3 items"
    assert plan_evaluation(_settings(data, k=2)).tasks[0].n_samples == 2  # nothing to contradict


@pytest.mark.skipif(not (PAPER_SAFETY := Path(__file__).resolve().parents[2] / "shared" / "paper-data"
                         / "ood" / "safety_benchmark.jsonl").is_file(), reason="shared/paper-data is not present")  # fmt: skip
def test_the_duplicate_rows_of_a_real_benchmark_are_counted_once():
    """Counted independently of the reader: distinct (prompt, reference) pairs of the file."""
    lines = [json.loads(line) for line in PAPER_SAFETY.read_text().split("\n") if line.strip()]
    distinct = {json.dumps([r["prompt"], r["reward_model"]["ground_truth"]], sort_keys=True) for r in lines}
    settings = EvalSettings(suite=["safety"], data_dir=str(PAPER_SAFETY.parents[1]))
    (task,) = plan_evaluation(settings).tasks
    assert (task.n_total, task.n_rows) == (len(distinct), len(lines))
    assert len(distinct) < len(lines) and task.n_samples == 4


def test_the_scored_samples_and_the_bootstrap_see_unique_items(repeated):
    """lm-eval generates 4 samples for each of the 3 items (12 generations, not 48), avg@4 is the mean over an
    item's samples, and the paired bootstrap resamples 3 items."""
    from rpsft.evaluation.intervals import bootstrap_tradeoff
    from rpsft.evaluation.runner import evaluate

    def respond(doc, nth):  # the third problem: right on every other sample
        right = doc["user"] != PROBLEMS[2][0] or nth % 2 == 1
        return f"\\boxed{{{doc['target'] if right else 'no'}}}"

    lm = scripted_lm(respond)
    result = evaluate(lm, None, _settings(repeated, temperature=1.0))
    assert sorted(lm.seen.values()) == [4, 4, 4] and len(lm.contexts) == 12  # 3 prompts, 4 samples each
    items = result.items["rep"]
    assert items == [1.0, 1.0, 0.5]
    assert result.benchmarks["rep"].avg_at_k == pytest.approx(np.mean(items))
    draws = bootstrap_tradeoff(result.item_scores(), {"same": [result.item_scores()]}, draws=50)
    assert draws.n_items == {"rep": 3}

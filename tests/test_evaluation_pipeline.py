"""The lm-eval pipeline with scripted and tiny models: all repeats scored, config-only benchmarks, fail-fast
validation, hub-style sources, base-score cache, in-memory HF models and the loss-based metrics.

Expected numbers are computed by hand in the tests from the scripted responses.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import scripted_lm
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.settings import EvalSettings, load_eval_settings, plan_evaluation
from typer.testing import CliRunner

PAPER_DATA = Path(__file__).resolve().parents[2] / "shared" / "paper-data"
needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _math_row(question, answer, solution=None):
    row = {
        "prompt": [
            {
                "role": "system",
                "content": "Please reason step by step, and put your final answer within \\boxed{}.",
            },
            {"role": "user", "content": question},
        ],
        "reward_model": {"ground_truth": answer},
    }
    if solution is not None:
        row["solution"] = solution
    return row


def _mc_row(question, options, letter):
    listing = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    user = (
        f"{question}\n\nChoices:\n{listing}\n\nPlease answer with the single correct option letter (e.g., A)."
    )
    return {"prompt": [{"role": "user", "content": user}], "reward_model": {"ground_truth": letter}}


@pytest.fixture()
def synth_dir(tmp_path):
    """A data dir with a synthetic math benchmark and a synthetic MC benchmark, declared by config only."""
    _write_jsonl(
        tmp_path / "data" / "extra" / "arith.jsonl",
        [
            _math_row("What is 2+3?", "5", "2+3=\\boxed{5}"),
            _math_row("What is 1/2+1/4?", "\\frac{3}{4}"),
            _math_row("What is 7*6?", 42),
        ],
    )
    _write_jsonl(
        tmp_path / "data" / "extra" / "capitals.jsonl",
        [
            _mc_row("Capital of France?", ["Berlin", "Paris"], "B"),
            _mc_row("Capital of Italy?", ["Rome", "Oslo"], "A"),
        ],
    )
    config = tmp_path / "eval-synth.yaml"
    config.write_text(
        "data_dir: data\nsuite: id,ood\nbatch_size: 2\nmax_new_tokens: 8\nbenchmarks:\n"
        "  - {name: synth_arith, suite: id, scorer: math, file: extra/arith.jsonl, k: 4}\n"
        "  - {name: synth_capitals, suite: ood, scorer: mc, file: extra/capitals.jsonl, k: 2}\n"
    )
    return config


def _only_extras(config, **overrides):
    return load_eval_settings(config, {"suite": "synth_arith,synth_capitals", "cache_dir": None, **overrides})


# -------------------------------------------------------------------------------- repeats and extra configs


def test_all_repeats_are_scored_and_config_only_benchmarks_run(synth_dir, tmp_path):
    from rpsft.evaluation.runner import evaluate

    correct = {  # (benchmark, index) -> samples (of 4 / of 2) that answer correctly
        ("synth_arith", 0): {0, 2},
        ("synth_arith", 1): {3},  # only the LAST sample is right: lm-eval's take_first would score 0
        ("synth_arith", 2): set(),
        ("synth_capitals", 0): {1},
        ("synth_capitals", 1): {0, 1},
    }
    answers = {
        ("synth_arith", 0): "\\boxed{5}",
        ("synth_arith", 1): "\\boxed{\\dfrac{3}{4}}",
        ("synth_arith", 2): "\\boxed{42}",
    }

    def respond(doc, i):
        key = (doc["benchmark"], doc["index"])
        if doc["scorer"] == "math":
            return f"so {answers[key]}" if i in correct[key] else "so \\boxed{-1}"
        return f"The answer is {doc['target']}" if i in correct[key] else "The answer is (Z)"

    lm = scripted_lm(respond)
    settings = _only_extras(synth_dir, cache_dir=str(tmp_path / "cache"))
    result = evaluate(lm, settings=settings, log_samples=True)
    arith, caps = result.benchmarks["synth_arith"], result.benchmarks["synth_capitals"]
    assert (arith.n_samples, caps.n_samples) == (4, 2) and (arith.n_items, caps.n_items) == (3, 2)
    # hand computation: avg@4 per item 2/4, 1/4, 0 -> 0.25; pass@4 per item 1, 1, 0 -> 2/3
    assert arith.avg_at_k == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert arith.pass_at_k == pytest.approx(2 / 3)
    # capitals: avg@2 1/2, 1 -> 0.75; pass@2 -> 1
    assert caps.avg_at_k == pytest.approx(0.75) and caps.pass_at_k == pytest.approx(1.0)
    assert result.suites == pytest.approx({"id": 0.25, "ood": 0.75})
    assert len(result.samples["synth_arith"][1]["responses"]) == 4
    # the prompt is the item's own system + user message through the chat template, no few-shot
    assert lm.contexts[0].startswith("<system>Please reason step by step")
    # pass@k with k < n: unbiased estimator, per item 1 - C(2,2)/C(4,2) = 5/6, 1 - C(3,2)/C(4,2) = 1/2, 0
    result2 = evaluate(scripted_lm(respond), settings=settings.model_copy(update={"pass_k": 2}))
    assert result2.benchmarks["synth_arith"].pass_at_k == pytest.approx((5 / 6 + 1 / 2 + 0) / 3)


def test_k_override_and_generation_settings(synth_dir, tmp_path):
    settings = _only_extras(synth_dir, k=1)
    plan = plan_evaluation(settings)
    assert [t.n_samples for t in plan.tasks] == [1, 1]
    # the same entries from a separate benchmarks file; a suite name brings the extras of that suite
    entries = tmp_path / "more.yaml"
    entries.write_text("- {name: more_arith, suite: id, scorer: math, file: extra/arith.jsonl, k: 3}\n")
    data_dir = str(synth_dir.parent / "data")
    more = plan_evaluation(
        EvalSettings(
            suite="id",
            exclude="aime24,aime25,amc23,math500,minerva,olympiadbench",
            data_dir=data_dir,
            benchmarks_file=str(entries),
        )
    )
    assert [(t.bench.name, t.n_samples, len(t.items)) for t in more.tasks] == [("more_arith", 3, 3)]
    assert settings.generation_kwargs(1) == {
        "until": [],
        "max_gen_toks": 8,
        "do_sample": False,
        "temperature": 0.0,
    }
    assert (
        settings.generation_kwargs(4)["do_sample"] is True
        and settings.generation_kwargs(4)["temperature"] == 0.6
    )


def test_plan_hash_covers_what_changes_the_scores_and_not_where_the_data_lives(synth_dir, tmp_path):
    import ast
    import shutil

    from rpsft.evaluation.lm_eval_tasks import plan_config_hash

    plan = plan_evaluation(_only_extras(synth_dir))
    assert plan_config_hash(plan) == plan_config_hash(plan_evaluation(_only_extras(synth_dir)))
    for change in ({"limit": 1}, {"k": 1}, {"max_new_tokens": 9}, {"seed": 7}):
        assert plan_config_hash(plan_evaluation(_only_extras(synth_dir, **change))) != plan_config_hash(plan)
    moved = tmp_path / "moved"
    shutil.copytree(synth_dir.parent / "data", moved)

    def moved_hash() -> str:
        return plan_config_hash(plan_evaluation(_only_extras(synth_dir, data_dir=str(moved))))

    assert moved_hash() == plan_config_hash(plan)  # the same files elsewhere
    arith = moved / "extra" / "arith.jsonl"
    arith.write_text(arith.read_text().replace("7*6", "6*7"))
    assert moved_hash() != plan_config_hash(plan)  # a changed item
    # the settings and the plan know nothing of lm-eval tasks (the task definitions build on the plan)
    source = Path(__file__).resolve().parents[1] / "evaluation" / "settings.py"
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert "rpsft.evaluation.lm_eval_tasks" not in imported and "lm_eval" not in imported


@needs_paper_data
def test_paper_k_defaults_and_subsets():
    """Each task samples its benchmark's own k unless --samples overrides it, and counts the items of the file
    it reads (the _test file with subset=test, where there is one), counted here from the files themselves."""
    settings = EvalSettings(suite="id,ood", exclude="supergpqa", data_dir=str(PAPER_DATA), limit=1)
    plan = plan_evaluation(settings, check_ifeval=False)
    assert {t.bench.suite for t in plan.tasks} == {"id", "ood"} and "supergpqa" not in plan.task_names
    assert {t.n_samples for t in plan.tasks} >= {4, 16}  # the paper's k differ between benchmarks
    for task in plan.tasks:
        assert task.n_samples == task.bench.k, task.bench.name
    forced = plan_evaluation(settings.model_copy(update={"k": 2}), check_ifeval=False)
    assert {t.n_samples for t in forced.tasks} == {2}

    def lines(name: str) -> int:
        # JSON lines end at "\n" only (str.splitlines would also split at a U+2028 inside a string)
        return sum(1 for line in (PAPER_DATA / "ood" / name).read_text().split("\n") if line.strip())

    full = plan_evaluation(EvalSettings(suite="gpqa,mmlu_pro", data_dir=str(PAPER_DATA)))
    test = plan_evaluation(EvalSettings(suite="gpqa,mmlu_pro", data_dir=str(PAPER_DATA), subset="test"))
    assert not (PAPER_DATA / "ood" / "mmlu_pro_test.jsonl").exists()
    assert [t.n_total for t in full.tasks] == [lines("gpqa.jsonl"), lines("mmlu_pro.jsonl")]
    assert [t.n_total for t in test.tasks] == [lines("gpqa_test.jsonl"), lines("mmlu_pro.jsonl")]
    assert lines("gpqa_test.jsonl") < lines("gpqa.jsonl")


# ------------------------------------------------------------------------------------------- bad input


def _cli_fails(monkeypatch, args):
    """Run `rpsft eval` and assert it fails with exit 2 before any model is loaded."""
    import rpsft.core.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(rpsft.core.models, "load_model", no_load)
    from rpsft.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m-instruct", *args])
    assert result.exit_code == 2, result.output
    return result.output


def test_bad_input_fails_before_any_model_is_loaded(monkeypatch, tmp_path, synth_dir):
    out = _cli_fails(monkeypatch, ["--suite", "id", "--data-dir", str(tmp_path / "nowhere")])
    assert "data_dir" in out and "does not exist" in out
    out = _cli_fails(monkeypatch, ["--suite", "id,ood,math501", "--data-dir", str(tmp_path)])
    assert "unknown benchmark or suite 'math501'" in out and "math500" in out
    # a data dir without the benchmark's file
    out = _cli_fails(monkeypatch, ["--suite", "aime24", "--data-dir", str(tmp_path)])
    assert "file id/aime-24.jsonl not found" in out and "--exclude aime24" in out
    # a row without a ground truth, with its file and line
    bad = _write_jsonl(tmp_path / "bad" / "id" / "amc.jsonl", [_math_row("1+1?", "2"), _math_row("2+2?", "")])
    out = _cli_fails(monkeypatch, ["--suite", "amc23", "--data-dir", str(bad.parents[1])])
    assert "amc.jsonl:2" in out and "without a ground truth" in out
    # an IFEval row without instructions
    row = {"prompt": "Write a poem.", "reward_model": {"ground_truth": ""}}
    _write_jsonl(tmp_path / "bad" / "ood" / "ifeval_loose.jsonl", [row])
    out = _cli_fails(monkeypatch, ["--suite", "ifeval", "--data-dir", str(tmp_path / "bad")])
    assert "without instructions" in out
    # a multiple-choice answer that is not an option
    _write_jsonl(tmp_path / "bad" / "ood" / "gpqa.jsonl", [_mc_row("Q?", ["x", "y"], "C")])
    out = _cli_fails(monkeypatch, ["--suite", "gpqa", "--data-dir", str(tmp_path / "bad")])
    assert "not one of the option letters AB" in out
    # a malformed config entry names the field
    broken = tmp_path / "broken.yaml"
    broken.write_text("benchmarks:\n  - {name: x, suite: middle, scorer: math, file: a.jsonl}\n")
    out = _cli_fails(monkeypatch, ["--config", str(broken)])
    assert "benchmarks[0].suite" in out
    out = _cli_fails(monkeypatch, ["--config", str(synth_dir), "--samples", "0"])
    assert "--samples 0: input should be greater than or equal to 1" in out and " k:" not in out
    zero = tmp_path / "zero.yaml"
    zero.write_text("k: 0\n")  # the same value from a config file names its field
    out = _cli_fails(monkeypatch, ["--config", str(zero)])
    assert "k: Input should be greater than or equal to 1" in out


@needs_paper_data
def test_missing_supergpqa_names_the_fix():
    with pytest.raises(
        EvalConfigError, match=r"supergpqa: file ood/supergpqa.jsonl not found.*--exclude supergpqa"
    ):
        plan_evaluation(EvalSettings(suite="ood", data_dir=str(PAPER_DATA), limit=1))


def test_no_data_dir_and_no_hub_source_fails():
    with pytest.raises(
        EvalConfigError, match="safety: no data dir given and the benchmark has no hub source"
    ):
        plan_evaluation(EvalSettings(suite="safety"))


# ------------------------------------------------------------------------------------------ hub sources


def test_hub_source_mapping_from_a_local_dataset_dir(tmp_path):
    """A hub-style dataset (other field names, options in a list, one-hot labels) becomes paper-format items."""
    from rpsft.evaluation.benchmarks import Benchmark, HubSource
    from rpsft.evaluation.items import load_items

    _write_jsonl(
        tmp_path / "hubmc" / "train.jsonl",
        [
            {"q": "Sky color?", "mc": {"choices": ["blue", "green", "red"], "labels": [1, 0, 0]}},
            {"q": "Grass color?", "mc": {"choices": ["green", "blue", "red"], "labels": [1, 0, 0]}},
        ],
    )
    bench = Benchmark(
        name="hub_mc",
        suite="ood",
        scorer="mc",
        hub=HubSource(
            path=str(tmp_path / "hubmc"),
            split="train",
            question="q",
            choices="mc.choices",
            answer="mc.labels",
            answer_format="onehot",
            shuffle_choices=True,
        ),
    )
    items = load_items(bench)
    for item, truth in zip(items, ["blue", "green"]):
        choices = json.loads(item.choices)
        assert choices[item.target] == truth and sorted(choices.values()) == sorted(["blue", "green", "red"])
        assert item.user.startswith(item.user.split("\n")[0]) and "\nChoices:\nA. " in item.user
    order = [json.loads(it.choices) for it in items]
    assert order == [json.loads(it.choices) for it in load_items(bench.model_copy(update={"title": "x"}))]

    _write_jsonl(tmp_path / "hubmath" / "test.jsonl", [{"problem": "1+1?", "answer": "2", "solution": "s"}])
    math_bench = Benchmark(
        name="hub_math",
        suite="id",
        scorer="math",
        has_solutions=True,
        hub=HubSource(path=str(tmp_path / "hubmath"), split="test", question="problem", solution="solution"),
    )
    (item,) = load_items(math_bench)
    assert (item.user, item.target, item.solution) == ("1+1?", "2", "s")
    assert item.system.startswith("Please reason step by step")
    bad = math_bench.model_copy(update={"hub": math_bench.hub.model_copy(update={"question": "question"})})
    with pytest.raises(EvalConfigError, match="hub row has no field 'question'"):
        load_items(bad)


# ------------------------------------------------------------------------------------ base-score cache


def test_base_scores_are_cached_per_model_and_task_config(synth_dir, tmp_path):
    from rpsft.evaluation.runner import evaluate
    from rpsft.evaluation.scoring import base_scores, compute_tradeoff

    settings = _only_extras(synth_dir, cache_dir=str(tmp_path / "cache"), k=2)

    def base_respond(doc, i):  # right on sample 0 only
        return f"\\boxed{{{doc['target']}}}" if i == 0 else "\\boxed{-1}"

    base_lm = scripted_lm(base_respond)
    first, hit = base_scores(base_lm, settings=settings, key="base-model")
    assert not hit and base_lm.calls == 1
    again_lm = scripted_lm(base_respond)
    second, hit = base_scores(again_lm, settings=settings, key="base-model")
    assert hit and again_lm.calls == 0 and second == first
    # another task config (k) or another model key is another cache entry
    _, hit = base_scores(
        scripted_lm(base_respond), settings=settings.model_copy(update={"k": 1}), key="base-model"
    )
    assert not hit
    _, hit = base_scores(scripted_lm(base_respond), settings=settings, key="other-model")
    assert not hit

    def tuned_respond(doc, i):  # math always right, MC always wrong
        return f"\\boxed{{{doc['target']}}}" if doc["scorer"] == "math" else "\\boxed{Z}"

    tuned = evaluate(scripted_lm(tuned_respond), settings=settings)
    trade = compute_tradeoff(first, tuned, betas=[0.5, 1.0])
    # base: arith 0.5, capitals 0.5 (sample 0 of 2 right); tuned: arith 1.0, capitals 0.0
    assert trade.g_id == pytest.approx(0.5) and trade.f_ood == pytest.approx(0.5)
    assert trade.phi == pytest.approx({"0.5": 0.25, "1.0": 0.0})
    other = evaluate(scripted_lm(tuned_respond), settings=settings.model_copy(update={"k": 1}))
    with pytest.raises(EvalConfigError, match="different task configs"):
        compute_tradeoff(first, other)


# -------------------------------------------------------------------------- in-memory HF model (tiny)


@pytest.fixture(scope="module")
def tiny_pair(smol_tokenizer):
    from rpsft.core.models import tiny_model

    return tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0), smol_tokenizer


def test_in_memory_model_runs_through_hflm_and_state_is_restored(synth_dir, tiny_pair):
    from rpsft.evaluation.runner import evaluate

    model, tokenizer = tiny_pair
    model.train()
    random.seed(7)
    torch.manual_seed(7)
    expected_py, expected_torch = random.random(), torch.rand(1)
    random.seed(7)
    torch.manual_seed(7)
    settings = _only_extras(synth_dir, k=2, max_new_tokens=3, temperature=1.0)
    result = evaluate(model, tokenizer, settings, log_samples=True)
    assert model.training  # train mode restored
    assert random.random() == expected_py and torch.equal(torch.rand(1), expected_torch)  # RNG restored
    assert result.benchmarks["synth_arith"].n_items == 3
    assert all(len(s["responses"]) == 2 for s in result.samples["synth_arith"])
    # every repeat is its own sample (temperature 1): the repeats of an item differ
    assert any(len(set(s["responses"])) == 2 for s in result.samples["synth_arith"])


# ----------------------------------------------------------------------------------- loss-based metrics


def test_loss_metrics_by_hand_and_moving_in_the_right_direction(tmp_path, tiny_pair):
    import copy

    import rpsft.evaluation.loss_metrics as lm_mod
    from rpsft.evaluation.loss_metrics import LossSettings, loss_items, loss_tradeoff, token_kl, token_nll

    model, tokenizer = tiny_pair
    base = copy.deepcopy(model).eval()
    data = tmp_path / "data"
    _write_jsonl(
        data / "id" / "math500.jsonl",
        [_math_row(f"What is {i}+{i}?", str(2 * i), f"{i}+{i}=\\boxed{{{2 * i}}}") for i in range(1, 5)],
    )
    _write_jsonl(
        data / "ood" / "truthful_qa_mc.jsonl", [_mc_row(f"Q{i}?", ["yes", "no"], "A") for i in range(3)]
    )
    settings = LossSettings(
        data_dir=str(data),
        id_benchmarks=["math500"],
        ood_benchmarks=["truthfulqa_mc"],
        max_new_tokens=6,
        cache_dir=str(tmp_path / "cache"),
        batch_size=3,
    )
    items = loss_items(settings)
    conv = items.id_conversations["math500"][0]
    # NLL by hand: HF's own mean token loss over the same labels
    from rpsft.core.data import tokenize_example

    enc = tokenize_example(conv, tokenizer, 1024)
    with torch.no_grad():
        hf_loss = base(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
    ((nll_sum, n_tok),) = token_nll(base, tokenizer, [conv])
    assert n_tok == sum(label != -100 for label in enc["labels"]) - 0 and nll_sum / n_tok == pytest.approx(
        hf_loss.item(), rel=1e-4
    )
    # batching with padding does not change per-conversation NLLs
    batched = token_nll(base, tokenizer, items.id_conversations["math500"], batch_size=4)
    single = [token_nll(base, tokenizer, [c])[0] for c in items.id_conversations["math500"]]
    assert [round(s, 3) for s, _ in batched] == [round(s, 3) for s, _ in single]
    assert token_kl(base, base, tokenizer, [conv])[0][0] == pytest.approx(0.0, abs=1e-6)

    # the tuned model: a few SGD steps on the ID reference solutions -> their NLL drops (G_id > 0)
    tuned = copy.deepcopy(model)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.5)
    from rpsft.core.data import SFTCollator

    batch = SFTCollator(tokenizer.pad_token_id)(
        [tokenize_example(c, tokenizer, 1024) for c in items.id_conversations["math500"]]
    )
    tuned.train()
    for _ in range(5):
        tuned(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    out = loss_tradeoff(tuned, tokenizer, settings, base_model=base, betas=[1.0])
    assert out.nll.g_id == pytest.approx(out.base.id_nll["math500"] - out.tuned.id_nll["math500"])
    assert out.nll.g_id > 0
    assert out.nll.f_ood == pytest.approx(
        out.tuned.ood_nll["truthfulqa_mc"] - out.base.ood_nll["truthfulqa_mc"]
    )
    assert out.kl.f_ood == pytest.approx(out.tuned.ood_kl["truthfulqa_mc"]) and out.kl.f_ood > 0
    assert out.nll.phi["1.0"] == pytest.approx(out.nll.g_id - out.nll.f_ood)
    # the per-item sums behind each benchmark's token-weighted mean, for base and tuned alike
    for scores in (out.base, out.tuned):
        for means, per_item in ((scores.id_nll, scores.id_nll_items), (scores.ood_nll, scores.ood_nll_items)):
            for name, pairs in per_item.items():
                assert len(pairs) == {"math500": 4, "truthfulqa_mc": 3}[name]
                assert means[name] == pytest.approx(sum(s for s, _ in pairs) / sum(n for _, n in pairs))
    kl_pairs = out.tuned.ood_kl_items["truthfulqa_mc"]
    assert out.tuned.ood_kl["truthfulqa_mc"] == pytest.approx(
        sum(s for s, _ in kl_pairs) / sum(n for _, n in kl_pairs)
    )
    # base responses and base NLLs are cached: a second call needs no generation and no base forward pass
    monkey = pytest.MonkeyPatch()
    monkey.setattr(
        lm_mod, "greedy_responses", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
    )
    try:
        key = __import__("rpsft.evaluation.scoring", fromlist=["model_fingerprint"]).model_fingerprint(base)
        again = loss_tradeoff(tuned, tokenizer, settings.model_copy(update={"kl": False}), base_key=key)
    finally:
        monkey.undo()
    assert again.nll.g_id == pytest.approx(out.nll.g_id) and again.nll.f_ood == pytest.approx(out.nll.f_ood)

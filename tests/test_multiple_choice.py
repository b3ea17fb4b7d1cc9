"""Log-likelihood multiple choice: cloze docs, the lm-eval tasks, and the in-memory scorer.

The scorer is checked against lm-eval's own ``HFLM`` (same per-option loglikelihoods, acc and acc_norm) on real
and unseen items, and against log-probs computed by hand from a model whose logits are known.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import PAPER_DATA
from rpsft.evaluation.benchmarks import Benchmark, EvalConfigError, build_registry
from rpsft.evaluation.items import EvalDataError, Item
from rpsft.evaluation.multiple_choice import (
    MC_TAG,
    MCDoc,
    encode_pair,
    mc_doc,
    mc_docs,
    mc_item_scores,
    mc_scores_by_benchmark,
    mc_task_config,
    pair_loglikelihoods,
    score_from_lls,
    split_mc_prompt,
    write_mc_task_dir,
)

needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
INSTRUCTION = "Please answer with the single correct option letter (e.g., A)."
MAX_LENGTH = 128  # below some GPQA items' length: lm-eval's left truncation is exercised too


def _row(question: str, options: list[str], gold: str, labels: str = "ABCDEFGHIJ", header: bool = True):
    listing = "\n".join(f"{label}. {text}" for label, text in zip(labels, options))
    user = f"{question}\n\n{'Choices:' + chr(10) if header else ''}{listing}\n\n{INSTRUCTION}"
    return {
        "prompt": [
            {"role": "system", "content": "Please reason step by step."},
            {"role": "user", "content": user},
        ],
        "reward_model": {"ground_truth": gold},
    }


def _write_bench(tmp_path: Path, name: str, rows: list, raw_lines: list[str] | None = None) -> Benchmark:
    path = tmp_path / f"{name}.jsonl"
    lines = [json.dumps(r) for r in rows] + list(raw_lines or [])
    path.write_text("\n".join(lines) + "\n")
    return Benchmark(name=name, suite="ood", scorer="mc", file=str(path))


def _item(user: str, target: str, name: str = "hand") -> Item:
    return Item(benchmark=name, index=0, scorer="mc", system="", user=user, target=target, ground_truth="")


# ------------------------------------------------------------------------------------------------ parsing


def test_stem_options_gold_letters():
    user = (
        "Which gas do plants absorb?\nThink about photosynthesis.\n\nChoices:\nA. Oxygen\nB. Carbon dioxide\n"
        f"C. Nitrogen\n\n{INSTRUCTION}"
    )
    doc = mc_doc(_item(user, "b"))
    assert doc.stem == "Which gas do plants absorb?\nThink about photosynthesis."
    assert doc.options == ["Oxygen", "Carbon dioxide", "Nitrogen"]
    assert doc.labels == ["A", "B", "C"] and doc.gold == 1 and doc.target == "B"
    assert doc.context == f"Question: {doc.stem}\nAnswer:"
    assert doc.requests()[2] == (doc.context, " Nitrogen")


def test_stem_numbered_labels_without_header_and_multiline_options():
    user = (
        "Pick the ordered steps.\n1) warm up\n\n1. first\n   then second\n2. only one step\n3. x = {a}\n\n"
        + INSTRUCTION
    )
    stem, choices = split_mc_prompt(user)
    # the list parse_choices returns starts at "1. first": the earlier "1)" line belongs to the question
    assert stem == "Pick the ordered steps.\n1) warm up"
    assert choices == {"1": "first\nthen second", "2": "only one step", "3": "x = {a}"}
    doc = mc_doc(_item(user, "3"))
    assert doc.gold == 2 and doc.options[0] == "first\nthen second"
    assert doc.context.endswith("1) warm up\nAnswer:")


def test_template_and_braces_in_stem():
    doc = mc_doc(_item("Is {x} a set?\n\nChoices:\nA. yes\nB. no", "A"), "Q: {stem}\nA: ")
    assert doc.context == "Q: Is {x} a set?\nA: "
    with pytest.raises(EvalConfigError, match="template"):
        mc_docs(Benchmark(name="t", suite="ood", scorer="mc", file="x.jsonl"), None, template="{question}")


def test_malformed_rows_name_file_line_field_and_fix(tmp_path):
    good = _row("What is 2+2?", ["3", "4"], "B")
    no_stem = _row("", ["3", "4"], "B")
    bench = _write_bench(tmp_path, "bad_stem", [good], ["", json.dumps(no_stem)])
    with pytest.raises(EvalDataError) as err:
        mc_docs(bench, tmp_path)
    message = str(err.value)
    assert f"{bench.file}:3" in message and "prompt" in message and "Fix:" in message  # line 3: blank line 2

    empty_option = dict(good)
    empty_option["prompt"] = [{"role": "user", "content": f"Q?\n\nChoices:\nA. yes\nB.\n\n{INSTRUCTION}"}]
    bench = _write_bench(tmp_path, "bad_option", [good, empty_option])
    with pytest.raises(EvalDataError, match=r"bad_option\.jsonl:2: prompt .*option B has no text.*Fix:"):
        write_mc_task_dir([bench], tmp_path, "full", tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()  # every row is checked before anything is written

    no_options = {"prompt": "What is 2+2? Answer in words.", "reward_model": {"ground_truth": "A"}}
    bench = _write_bench(tmp_path, "no_options", [no_options])
    with pytest.raises(EvalDataError, match=r"no_options\.jsonl:1: no options found.*Fix:"):
        mc_task_config(bench, tmp_path)

    math_bench = build_registry()["math500"]
    with pytest.raises(EvalConfigError, match="scorer 'mc'"):
        mc_docs(math_bench, tmp_path)


def test_task_config_shape(tmp_path):
    bench = _write_bench(tmp_path, "syn", [_row("What is 2+2?", ["3", "4"], "B")])
    config = mc_task_config(bench, tmp_path, limit=1)
    assert config["task"] == "rpsft_mc_syn" and config["tag"] == [MC_TAG]
    assert config["output_type"] == "multiple_choice"
    assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == (
        "context",
        "options",
        "gold",
    )
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    text = (write_mc_task_dir([bench], tmp_path, "full", tmp_path / "t") / "rpsft_mc_syn.yaml").read_text()
    assert "!function" in text and "rpsft.evaluation.multiple_choice.load_mc_docs" in text


# --------------------------------------------------------------------------------------- scorer by hand


class _BigramLM(torch.nn.Module):
    """logits[t] = E[input_ids[t]] @ U: the next-token distribution depends on the current token only."""

    def __init__(self, vocab: int, dim: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * 3)
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.emb[input_ids] @ self.out)


def test_scores_equal_hand_computed_logprobs(smol_tokenizer):
    tok = smol_tokenizer
    model = _BigramLM(len(tok))
    docs = [
        mc_doc(_item(f"Q{i}: which {'long ' * i}word?\n\nChoices:\nA. cat\nB. a dog\nC. x y z", "ABC"[i % 3]))
        for i in range(5)
    ]
    docs[1].context += "  "  # trailing whitespace: moves to the continuation
    model.train()
    batched = mc_item_scores(model, tok, docs, batch_size=4, max_length=12)
    assert model.training  # mode restored
    single = mc_item_scores(model, tok, docs, batch_size=1, max_length=12)

    def logp(prev: int, token: int) -> float:
        return float(torch.log_softmax(model.emb[prev] @ model.out, dim=-1)[token].detach())

    for doc, b, s in zip(docs, batched, single):
        expected = []
        for context, continuation in doc.requests():
            stripped = context.rstrip()
            whole = tok.encode(context + continuation)
            ctx = tok.encode(stripped)
            assert whole[: len(ctx)] == ctx
            cont = whole[len(ctx) :]
            full = (ctx + cont)[-13:]  # max_length + 1 tokens; the first kept one is never predicted
            prev = full[-len(cont) - 1 : -1]
            expected.append(sum(logp(p, t) for p, t in zip(prev, cont)))
        assert b.ll == pytest.approx(expected, abs=1e-4)
        assert s.ll == pytest.approx(b.ll, abs=1e-5)
        pred = max(range(3), key=lambda i: expected[i])
        pred_norm = max(range(3), key=lambda i: expected[i] / len(doc.options[i]))
        assert b.acc == float(pred == doc.gold) and b.acc_norm == float(pred_norm == doc.gold)
        probs = [math.exp(x) for x in expected]
        assert b.gold_prob == pytest.approx(probs[doc.gold] / sum(probs), rel=1e-4)


def test_acc_norm_divides_by_option_characters():
    doc = MCDoc("b", 0, "s", ["A", "B", "C"], ["a", "bbbb", "cc"], 1, "Question: s\nAnswer:")
    score = score_from_lls(doc, [-2.0, -6.0, -5.0])
    # raw argmax: "a" (-2); per character: -2, -1.5, -2.5 -> "bbbb"
    assert (score.pred, score.pred_norm, score.acc, score.acc_norm) == (0, 1, 0.0, 1.0)
    z = math.exp(-2.0) + math.exp(-6.0) + math.exp(-5.0)
    assert score.gold_prob == pytest.approx(math.exp(-6.0) / z)
    assert score_from_lls(doc, [-9.0, -1.0, -1.0]).pred == 1  # ties: the first, as numpy.argmax


def test_encode_pair_moves_trailing_whitespace(smol_tokenizer):
    ctx, cont = encode_pair(smol_tokenizer, "Answer: ", "yes")
    assert ctx == smol_tokenizer.encode("Answer:")
    assert ctx + cont == smol_tokenizer.encode("Answer: yes")


# ----------------------------------------------------------------------------- against lm-eval's HFLM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    from sweep_helpers import tiny_model_dir
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(tmp_path_factory.mktemp("mc-tiny"), smol_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model


def _hflm(model, tokenizer, batch_size=3):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=MAX_LENGTH)


def _lm_eval_samples(model, tokenizer, task_dirs, tasks, limit):
    import lm_eval
    from lm_eval.tasks import TaskManager

    raw = lm_eval.simple_evaluate(
        model=_hflm(model, tokenizer),
        tasks=tasks,
        task_manager=TaskManager(include_path=[str(d) for d in task_dirs], include_defaults=False),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )
    return raw


def _check_against_lm_eval(raw, task, docs, scores):
    samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == len(scores)
    for sample, doc, score in zip(samples, docs, scores):
        assert sample["doc"]["index"] == doc.index
        assert [tuple(a) for a in sample["arguments"]] == [tuple(r) for r in doc.requests()]
        lls = [float(r[0][0]) for r in sample["resps"]]
        assert score.ll == pytest.approx(lls, abs=1e-4)
        assert (score.acc, score.acc_norm) == (sample["acc"], sample["acc_norm"])
    n = len(docs)
    assert raw["results"][task]["acc,none"] == pytest.approx(sum(s.acc for s in scores) / n)
    assert raw["results"][task]["acc_norm,none"] == pytest.approx(sum(s.acc_norm for s in scores) / n)


@needs_paper_data
def test_same_numbers_as_lm_eval_on_paper_data(tiny, smol_tokenizer, tmp_path):
    registry = build_registry()
    names, limit = ["gpqa", "arc_c", "mmlu_pro"], 3
    task_dir = write_mc_task_dir(names, PAPER_DATA, "full", tmp_path / "tasks")
    raw = _lm_eval_samples(tiny, smol_tokenizer, [task_dir], [MC_TAG], limit)
    assert sorted(raw["samples"]) == sorted(f"rpsft_mc_{n}" for n in names)  # the tag selects them all
    truncated = False
    for name in names:
        docs = mc_docs(registry[name], PAPER_DATA, limit=limit)
        scores = mc_item_scores(tiny, smol_tokenizer, docs, batch_size=5, max_length=MAX_LENGTH)
        _check_against_lm_eval(raw, f"rpsft_mc_{name}", docs, scores)
        truncated |= any(
            sum(map(len, encode_pair(smol_tokenizer, *r))) > MAX_LENGTH + 1
            for d in docs
            for r in d.requests()
        )
    assert truncated  # the left truncation path was compared too


def test_same_numbers_as_lm_eval_on_unseen_items(tiny, smol_tokenizer, tmp_path):
    rows = [
        _row("Which planet is red?", ["Mars", "Venus", "Jupiter's moon Io"], "A"),
        _row("Order these:", ["first line\nsecond line", "  spaced  ", "(c) 42%"], "c", labels="123"),
        _row("Best reply to 'hi'?", ["hello there, friend", "no"], "A", header=False),
        _row("x = ?\n\nwhere x solves $x^2 = 4$ and x > 0", [str(i) for i in range(1, 9)], "B"),
    ]
    rows[1]["reward_model"]["ground_truth"] = "3"
    data = tmp_path / "data"
    data.mkdir()
    plain = _write_bench(data, "syn", rows)
    spaced = Benchmark(name="syn_ws", suite="ood", scorer="mc", file=plain.file)
    dirs = [
        write_mc_task_dir([plain], data, "full", tmp_path / "plain"),
        write_mc_task_dir([spaced], data, "full", tmp_path / "spaced", template="Q: {stem}\nA: "),
    ]
    raw = _lm_eval_samples(tiny, smol_tokenizer, dirs, ["rpsft_mc_syn", "rpsft_mc_syn_ws"], None)
    for bench, template in ((plain, "Question: {stem}\nAnswer:"), (spaced, "Q: {stem}\nA: ")):
        docs = mc_docs(bench, data, template=template)
        assert len(docs) == len(rows)
        if bench is spaced:
            assert all(d.context.endswith(" ") for d in docs)
        scores = mc_item_scores(tiny, smol_tokenizer, docs, batch_size=4, max_length=MAX_LENGTH)
        _check_against_lm_eval(raw, f"rpsft_mc_{bench.name}", docs, scores)


def test_pair_loglikelihoods_match_hflm_directly(tiny, smol_tokenizer):
    from lm_eval.api.instance import Instance

    long_context = "Question: " + "many words here " * 40 + "\nAnswer:"
    pairs = [
        ("Question: what?\nAnswer: ", "yes"),
        ("Question: what?\nAnswer:\n\n", " no way"),
        ("Q", " " + "long answer " * 20),
        (long_context, " truncated on the left"),
        ("", "no context at all"),
    ]
    lm = _hflm(tiny, smol_tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    tiny.train()
    got = pair_loglikelihoods(tiny, smol_tokenizer, pairs, batch_size=3, max_length=MAX_LENGTH)
    assert tiny.training
    tiny.eval()
    assert got == pytest.approx(expected, abs=1e-4)


@needs_paper_data
def test_scores_by_benchmark_takes_first_items(tiny, smol_tokenizer):
    out = mc_scores_by_benchmark(
        tiny, smol_tokenizer, {"data_dir": str(PAPER_DATA), "benchmarks": "safety,truthfulqa_mc"}, n=2
    )
    assert list(out) == ["safety", "truthfulqa_mc"]
    registry = build_registry()
    for name, scores in out.items():
        assert [s.index for s in scores] == [0, 1]
        docs = mc_docs(registry[name], PAPER_DATA, limit=2)
        direct = mc_item_scores(tiny, smol_tokenizer, docs, batch_size=1)
        for s, d in zip(scores, direct):
            assert s.ll == pytest.approx(d.ll, abs=1e-4) and len(s.ll) == len(docs[0].options)
            top = max(s.ll)
            assert s.gold_prob == pytest.approx(
                math.exp(s.ll[s.gold] - top) / sum(math.exp(x - top) for x in s.ll)
            )
    with pytest.raises(EvalConfigError, match="unknown benchmark"):
        mc_scores_by_benchmark(tiny, smol_tokenizer, benchmarks=["nope"], data_dir=str(PAPER_DATA))


def test_mcdoc_is_plain_data():
    doc = MCDoc("b", 0, "s", ["A", "B"], ["x", "y"], 1, "Question: s\nAnswer:")
    assert doc.doc()["options"] == ["x", "y"] and doc.target == "B"
    import evaluation

    assert evaluation.mc_item_scores is mc_item_scores and evaluation.MCDoc is MCDoc

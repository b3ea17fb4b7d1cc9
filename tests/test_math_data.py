"""Tests of rpsft.core.math_data: the CHAMP source (split, rendering, labels) and the overlap guard."""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import PAPER_DATA
from rpsft.core.chat import MATH_SYSTEM_PROMPT
from rpsft.core.data import IGNORE_INDEX, DataError, load_examples, tokenize_example
from rpsft.core.math_data import (
    champ_problems,
    champ_split_of,
    champ_split_problems,
    find_overlap,
    render_champ_problem,
    split_champ_identifiers,
)


@pytest.fixture(scope="module")
def raw_problems() -> dict[str, dict]:
    """CHAMP's problems read straight from the installed wheel's file (not through rpsft.core)."""
    dist = importlib.metadata.distribution("champ-dataset")
    path = dist.locate_file("champ_dataset/dataset_files/v0.json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)["problems"]


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, braces matched."""
    out = []
    start = 0
    while (k := text.find("\\boxed{", start)) != -1:
        i = k + len("\\boxed{")
        depth = 1
        j = i
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append(text[i : j - 1])
        start = j
    return out


# ------------------------------------------------------------------------------------------ split


def test_champ_loads_are_deterministic_and_splits_partition_all():
    first = {split: load_examples(f"champ:{split}") for split in ("train", "heldout", "all")}
    champ_problems.cache_clear()  # the second load re-reads and re-parses the file
    second = {split: load_examples(f"champ:{split}") for split in ("train", "heldout", "all")}
    assert first == second
    assert load_examples("champ") == first["train"]

    train = [m[1]["content"] for m in first["train"]]
    heldout = [m[1]["content"] for m in first["heldout"]]
    everything = [m[1]["content"] for m in first["all"]]
    assert len(set(everything)) == len(everything) == len(champ_problems())
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(everything)
    assert len(train) + len(heldout) == len(everything)
    # About 90% / 10%.
    assert 0.05 <= len(heldout) / len(everything) <= 0.2
    # Each split is the split function applied per problem.
    for split in ("train", "heldout"):
        assert {champ_split_of(p.identifier) for p in champ_split_problems(split)} == {split}


def test_split_does_not_depend_on_input_order(raw_problems):
    identifiers = list(raw_problems)
    reference = split_champ_identifiers(identifiers)
    rng = random.Random(1234)
    for _ in range(5):
        shuffled = identifiers[:]
        rng.shuffle(shuffled)
        assert split_champ_identifiers(shuffled) == reference
    assert split_champ_identifiers(reversed(identifiers)) == reference
    assert sorted(reference["all"]) == sorted(identifiers)
    assert [p.identifier for p in champ_split_problems("heldout")] == reference["heldout"]


def test_split_does_not_depend_on_python_hash_seed():
    code = (
        "import json; from rpsft.core.math_data import champ_split_problems; "
        "print(json.dumps([p.identifier for p in champ_split_problems('heldout')]))"
    )
    here = [p.identifier for p in champ_split_problems("heldout")]
    for seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here


def test_champ_counts_and_limits():
    train = load_examples("champ:train")
    assert load_examples("champ:train:5") == train[:5]
    assert load_examples("champ:heldout:0") == []
    assert load_examples("champ:all", limit=3) == load_examples("champ:all")[:3]
    assert load_examples("champ:train:10", limit=4) == train[:4]
    assert load_examples("champ", limit=10**6) == train
    assert load_examples(f"champ:train:{len(train)}") == train


@pytest.mark.parametrize(
    "source, pattern",
    [
        ("champ:test", r"^data: .*unknown CHAMP split 'test'.*Fix: .*train, heldout, all"),
        ("champ:64", r"^data: .*champ:train:64"),
        ("champ:train:lots", r"^data: .*'lots' is not a number.*Fix: "),
        ("champ:train:-3", r"^data: .*is not a number.*Fix: "),
        ("champ:train:100000", r"^data: .*the train split has \d+.*Fix: use 0 <= N <= \d+"),
        ("champ:train:1:2", r"^data: .*not a CHAMP source.*Fix: "),
        ("champ:", r"^data: .*unknown CHAMP split ''"),
    ],
)
def test_bad_champ_specs(source, pattern):
    with pytest.raises(DataError, match=pattern):
        load_examples(source)


# ------------------------------------------------------------------------------------------ rendering


def test_rendering_boxes_exactly_the_dataset_answer(raw_problems):
    examples = load_examples("champ:all")
    by_problem = {raw["_text"].strip(): raw for raw in raw_problems.values()}
    assert len(examples) == len(raw_problems) == len(by_problem)
    seen = set()
    for messages in examples:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == MATH_SYSTEM_PROMPT
        raw = by_problem[messages[1]["content"]]
        seen.add(raw["identifier"])
        reply = messages[2]["content"]
        assert reply.count("\\boxed{") == 1, raw["identifier"]
        assert _boxed_contents(reply) == [raw["_answer"]], raw["identifier"]
        lines = reply.split("\n")
        assert lines[:-1] == [step["_text"].strip() for step in raw["solution"]["steps"]]
        assert lines[-1] == f"The final answer is $\\boxed{{{raw['_answer']}}}$."
        assert "@@" not in reply  # the _raw_text markup is not used
    assert seen == set(raw_problems)


def test_system_prompt_is_the_paper_datas():
    files = sorted((PAPER_DATA / "id").glob("*.jsonl")) if PAPER_DATA.is_dir() else []
    if not files:
        pytest.skip("shared/paper-data is not present")
    systems = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): rows hold U+2028
            if line.strip():
                systems |= {m["content"] for m in json.loads(line)["prompt"] if m["role"] == "system"}
    assert systems == {MATH_SYSTEM_PROMPT}
    assert {m[0]["content"] for m in load_examples("champ:all")} == systems


# ------------------------------------------------------------------------------------------ labels


def _check_assistant_only_labels(tokenizer, closing: str) -> None:
    for messages in load_examples("champ:all"):
        item = tokenize_example(messages, tokenizer, max_length=4096)
        ids, labels = item["input_ids"], item["labels"]
        assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(labels, ids))
        marked = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
        assert marked, "nothing labelled"
        start, end = marked[0], marked[-1] + 1
        assert marked == list(range(start, end)), "labels are not one contiguous run"
        # Everything before the run is exactly the system + user turns and the assistant header.
        header = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids[:start]) == header
        assert tokenizer.decode(ids[start:end]) == messages[2]["content"] + closing
        assert tokenizer.decode(ids[end:]).strip() == ""
        labelled = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert messages[1]["content"] not in labelled and MATH_SYSTEM_PROMPT not in labelled


def test_labels_under_smollm2_chat_template(smol_tokenizer):
    _check_assistant_only_labels(smol_tokenizer, "<|im_end|>")


@pytest.mark.slow
def test_labels_under_gemma3_chat_template():
    from rpsft.core.models import load_tokenizer

    _check_assistant_only_labels(load_tokenizer("gemma3-270m"), "<|im_end|>")


# ------------------------------------------------------------------------------------------ overlap


def _paper_prompts() -> list[str]:
    files = [p for sub in ("id", "ood") for p in sorted((PAPER_DATA / sub).glob("*.jsonl"))]
    prompts = []
    for path in files:
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): rows hold U+2028
            if line.strip():
                prompts += [m["content"] for m in json.loads(line)["prompt"] if m["role"] == "user"]
    return prompts


def test_no_overlap_with_paper_items_and_planted_overlap_is_found():
    if not ((PAPER_DATA / "id").is_dir() and (PAPER_DATA / "ood").is_dir()):
        pytest.skip("shared/paper-data is not present")
    prompts = _paper_prompts()
    assert len(prompts) > 1000
    champ = load_examples("champ:all")
    assert find_overlap(champ, prompts) == []

    # Plant: (a) a CHAMP problem with case, whitespace and $ changes, (b) the longest CHAMP problem with three
    # words replaced, (c) a CHAMP problem shorter than 8 words, exact apart from case.
    texts = [m[1]["content"] for m in champ]
    a = 7
    b = max(range(len(texts)), key=lambda i: len(texts[i].split()))
    c = min(range(len(texts)), key=lambda i: len(texts[i].split()))
    assert len(texts[c].split()) < 8
    words = texts[b].split()
    for k in (len(words) // 4, len(words) // 2, 3 * len(words) // 4):
        words[k] = "banana"
    planted = {
        a: "  $" + "  \n ".join(texts[a].upper().split(" ")).replace("=", "$=$") + "$\t",
        b: " ".join(words),
        c: texts[c].title(),
    }
    rng = random.Random(0)
    eval_prompts = prompts[:]
    positions = {}
    for train_index, text in planted.items():
        pos = rng.randrange(len(eval_prompts) + 1)
        eval_prompts.insert(pos, text)
        positions = {t: (p + 1 if p >= pos else p) for t, p in positions.items()}
        positions[train_index] = pos
    found = find_overlap(champ, eval_prompts)
    for train_index, pos in positions.items():
        assert (train_index, pos) in found, train_index
    assert {j for _, j in found} <= set(positions.values())


def test_find_overlap_threshold_roles_and_strings():
    words = [f"w{k}" for k in range(16)]  # 16 distinct words: 9 eight-grams
    prompt = " ".join(words)
    train = [
        [{"role": "user", "content": " ".join(words[:12])}],  # 5 of 9 grams: 56% -> flagged
        [{"role": "user", "content": " ".join(words[:11])}],  # 4 of 9 grams: 44% -> not
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": prompt}],  # not a user turn
        "unrelated text " + " ".join(words[4:]),  # a plain string; 5 of 9 grams -> flagged
    ]
    assert find_overlap(train, [prompt, "w0 w1"]) == [(0, 0), (3, 0)]
    assert find_overlap(train, [prompt], threshold=0.6) == []
    # Exactly half of the prompt's grams is enough: 15 words = 8 grams, the first 11 words hold 4 of them.
    assert find_overlap(train[1:2], [" ".join(words[:15])]) == [(0, 0)]
    assert find_overlap(train[1:2], [" ".join(words[:15])], threshold=0.51) == []
    assert find_overlap(train, [prompt], roles=("user", "assistant")) == [(0, 0), (2, 0), (3, 0)]
    assert find_overlap(train, ["W0  w1 w2 w3 w4 w5 w6 w7 w8 W9 w10"]) == [(0, 0), (1, 0)]
    assert find_overlap([[{"role": "user", "content": "Short $x$."}]], ["short x.", "short y."]) == [(0, 0)]
    with pytest.raises(ValueError):
        find_overlap(train, [prompt], threshold=0)


def test_render_champ_problem_is_pure():
    problem = champ_split_problems("all")[0]
    assert render_champ_problem(problem) == render_champ_problem(problem)
    assert render_champ_problem(problem) is not render_champ_problem(problem)

"""Tests of rpsft.core.data: reading, assistant-only labels, truncation, demo data, collation."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import PAPER_DATA
from rpsft.core.chat import MATH_SYSTEM_PROMPT
from rpsft.core.data import (
    DataError,
    SFTCollator,
    SFTDataset,
    build_sft_dataset,
    demo_math_examples,
    load_examples,
    read_jsonl_examples,
    row_to_messages,
    tokenize_example,
    write_jsonl,
)

IGNORE = -100


def _labelled_text(item: dict[str, list[int]], tokenizer) -> str:
    return tokenizer.decode([t for t in item["labels"] if t != IGNORE])


def _labelled_runs(item: dict[str, list[int]], tokenizer) -> list[str]:
    """Decoded text of each maximal run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE
    for label in item["labels"]:
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ labels


def test_assistant_only_labels_single_turn(smol_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5. The answer is \\boxed{5}."},
    ]
    item = tokenize_example(messages, smol_tokenizer, max_length=512)
    assert len(item["input_ids"]) == len(item["labels"]) == len(item["attention_mask"])
    assert set(item["attention_mask"]) == {1}
    full = smol_tokenizer.apply_chat_template(messages, tokenize=False)
    assert smol_tokenizer.decode(item["input_ids"]) == full
    # Labels are the input ids where set, and exactly the assistant content + the closing token.
    assert all(lab in (IGNORE, tok) for lab, tok in zip(item["labels"], item["input_ids"]))
    assert _labelled_runs(item, smol_tokenizer) == ["2 + 3 = 5. The answer is \\boxed{5}.<|im_end|>"]
    labelled = _labelled_text(item, smol_tokenizer)
    assert "terse" not in labelled and "2 + 3?" not in labelled
    assert "<|im_start|>" not in labelled and "assistant" not in labelled


def test_assistant_only_labels_multi_turn(smol_tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Add 1 and 1."},
        {"role": "assistant", "content": "1 + 1 = 2"},
        {"role": "user", "content": "Thanks"},
    ]
    item = tokenize_example(messages, smol_tokenizer, max_length=512)
    assert _labelled_runs(item, smol_tokenizer) == ["Hello! How can I help?<|im_end|>", "1 + 1 = 2<|im_end|>"]
    # The template's default system prompt (no system message given) is not labelled either.
    assert "SmolLM" in smol_tokenizer.decode(item["input_ids"])
    assert "SmolLM" not in _labelled_text(item, smol_tokenizer)


def test_not_prefix_stable_template_raises(smol_tokenizer):
    class Rewriting:
        """A template that rewrites earlier assistant turns once a later turn exists."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            last = len(messages) - 1
            text = "".join(
                f"[{m['role']}]{'...' if m['role'] == 'assistant' and i < last else m['content']}"
                for i, m in enumerate(messages)
            )
            return text + ("[assistant]" if add_generation_prompt else "")

    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    with pytest.raises(DataError, match="prefix-stable"):
        tokenize_example(messages, Rewriting(), max_length=64)


# ------------------------------------------------------------------------------------------ truncation


def test_truncation_and_dropping(smol_tokenizer, caplog):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "ok"},
    ]
    full_len = len(tokenize_example(short, smol_tokenizer, max_length=10_000)["input_ids"])
    assert full_len > 12

    cut = tokenize_example(short, smol_tokenizer, max_length=full_len - 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["attention_mask"]) == full_len - 3
    assert any(label != IGNORE for label in cut["labels"])  # assistant part partly kept (right truncation)
    full = tokenize_example(short, smol_tokenizer, max_length=10_000)
    assert cut["input_ids"] == full["input_ids"][: full_len - 3]

    with caplog.at_level(logging.WARNING, logger="rpsft.core.data"):
        dataset = build_sft_dataset([short, long_prompt, short], smol_tokenizer, max_length=64)
    assert isinstance(dataset, SFTDataset)
    assert len(dataset) == 2 and dataset.n_dropped == 1
    assert all(len(item["input_ids"]) <= 64 for item in dataset)
    assert "dropped 1 of 3" in caplog.text


def test_empty_dataset_raises(smol_tokenizer):
    with pytest.raises(DataError, match="no trainable examples"):
        build_sft_dataset([], smol_tokenizer, max_length=64)
    only_long = [[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]]
    with pytest.raises(DataError, match="no trainable examples.*Fix:"):
        build_sft_dataset(only_long, smol_tokenizer, max_length=32)


# ------------------------------------------------------------------------------------------ reading


def test_read_messages_and_prompt_response_rows(tmp_path):
    path = _write_lines(
        tmp_path / "file.jsonl",
        [
            json.dumps(
                {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}
            ),
            "",
            json.dumps({"prompt": "q2", "response": "a2"}),
            "   ",
            json.dumps({"problem": "q3", "solution": "a3"}),
        ],
    )
    assert read_jsonl_examples(path) == [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
        [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}],
    ]
    assert load_examples(str(path), limit=2) == read_jsonl_examples(path)[:2]


def test_prompt_as_message_list_rows_from_paper_data(tmp_path, smol_tokenizer):
    source = PAPER_DATA / "id" / "math500.jsonl"
    if not source.is_file():
        pytest.skip(f"paper data not found at {source}")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:3]]
    path = _write_lines(
        tmp_path / "paper.jsonl",
        [json.dumps({"prompt": row["prompt"], "response": row["solution"]}) for row in rows],
    )
    examples = read_jsonl_examples(path)
    assert len(examples) == 3
    for row, messages in zip(rows, examples):
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == MATH_SYSTEM_PROMPT  # demo data reuses the paper's system text
        assert messages[1]["content"] == row["prompt"][1]["content"]
        assert messages[2]["content"] == row["solution"]
    item = tokenize_example(examples[0], smol_tokenizer, max_length=4096)
    assert _labelled_runs(item, smol_tokenizer) == [rows[0]["solution"] + "<|im_end|>"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "q", "response": "a"', "invalid JSON"),
        ('{"prompt": "q"}', "'response' is missing"),
        ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}', "'bot'"),
        (
            '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
            "not a string",
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        ('{"prompt": "q", "response": "  "}', "no assistant message"),
        ('{"text": "q"}', "no 'messages'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"prompt": "q", "response": "a"})
    path = _write_lines(tmp_path / "file.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as excinfo:
        read_jsonl_examples(path)
    message = str(excinfo.value)
    assert "file.jsonl:3" in message
    assert problem in message
    assert "Fix:" in message


def test_missing_file_and_unknown_source(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl.*does not exist.*Fix:"):
        read_jsonl_examples(missing)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(missing))
    with pytest.raises(DataError, match="demo-math.*hf:"):
        load_examples("no-such-source")
    with pytest.raises(DataError, match="not a number"):
        load_examples("demo-math:lots")


def test_hf_source_converts_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(dataset_id, split):
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list([{"problem": f"p{i}", "solution": f"s{i}"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("hf:org/openr1-like", limit=2)
    assert calls == [("org/openr1-like", "train")]
    assert examples == [
        [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"s{i}"}] for i in range(2)
    ]
    load_examples("hf:org/other:test")
    assert calls[-1] == ("org/other", "test")


def test_write_jsonl_roundtrip(tmp_path):
    examples = demo_math_examples(5, seed=3)
    path = tmp_path / "sub" / "demo.jsonl"
    write_jsonl(path, examples)
    assert all("messages" in json.loads(line) for line in path.read_text().splitlines())
    assert read_jsonl_examples(path) == examples


# ------------------------------------------------------------------------------------------ demo math


def test_demo_math_deterministic_and_leaves_global_random(smol_tokenizer):
    random.seed(1234)
    state = random.getstate()
    first = demo_math_examples(64, seed=0)
    assert random.getstate() == state
    assert demo_math_examples(64, seed=0) == first
    assert demo_math_examples(64, seed=1) != first
    assert load_examples("demo-math:64") == first
    assert load_examples("demo-math", limit=10, seed=1) == demo_math_examples(10, seed=1)
    assert len(load_examples("demo-math")) == 512
    assert random.getstate() == state

    questions = {messages[1]["content"] for messages in first}
    assert len(questions) > 32  # varied problems
    for messages in first:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == MATH_SYSTEM_PROMPT
        assert "$" not in messages[1]["content"]
        assert re.search(r"The answer is \\boxed\{[^{}]+\}\.$", messages[2]["content"])
        n_tokens = len(tokenize_example(messages, smol_tokenizer, max_length=10_000)["input_ids"])
        assert n_tokens <= 110


def test_demo_math_answers_are_correct():
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "\\times": lambda x, y: x * y}
    checked = 0
    for messages in demo_math_examples(300, seed=7):
        question, answer = messages[1]["content"], messages[2]["content"]
        boxed = re.search(r"\\boxed\{([^{}]+)\}", answer).group(1)
        if m := re.fullmatch(r"What is (-?\d+) (\+|-|\\times) (-?\d+)\?", question):
            assert int(boxed) == ops[m.group(2)](int(m.group(1)), int(m.group(3)))
            checked += 1
        elif m := re.fullmatch(r"What is \|(-?\d+) - \(?(-?\d+)\)?\|\?", question):
            assert int(boxed) == abs(int(m.group(1)) - int(m.group(2)))
            checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "bot", "content": "x"}], "prompt[0] has role 'bot'"),
        ([{"role": "user", "content": 3}], "prompt[0] (user) has content of type int"),
        ([{"role": "system", "content": "s"}, "hi"], "prompt[1] must be an object with 'role' and 'content'"),
        ({"role": "user"}, "'prompt' must be"),
    ],
)
def test_one_reader_of_chat_messages_for_sft_eval_and_rl_rows(messages, problem):
    """SFT rows, evaluation items and RL prompts read a ``prompt`` message list with the same reader, so a
    bad message is refused by each with the same reason (its position and the fix)."""
    from rpsft.evaluation.benchmarks import builtin_registry
    from rpsft.evaluation.items import EvalDataError, _row_to_item
    from rpsft.evaluation.rl_prompts import row_to_rl_prompt

    bench = next(b for b in builtin_registry().values() if b.scorer == "math")
    readers = [
        (lambda: row_to_messages({"prompt": messages, "response": "a"}, "sft:1"), DataError),
        (
            lambda: _row_to_item(
                bench, {"prompt": messages, "reward_model": {"ground_truth": "1"}}, 0, "eval:1"
            ),
            EvalDataError,
        ),
        (lambda: row_to_rl_prompt({"prompt": messages, "answer": "1"}, "rl:1"), DataError),
    ]
    for read, error in readers:
        with pytest.raises(error) as excinfo:
            read()
        assert problem in str(excinfo.value) and "Fix:" in str(excinfo.value)
    # and a good list reads the same everywhere
    good = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert row_to_messages({"prompt": good, "response": "a"}, "sft:1")[:2] == good
    item = _row_to_item(bench, {"prompt": good, "reward_model": {"ground_truth": "1"}}, 0, "eval:1")
    assert item.messages() == good
    assert row_to_rl_prompt({"prompt": good, "answer": "1"}, "rl:1")["prompt"][1]["content"] == "q"


# ------------------------------------------------------------------------------------------ collator


def test_collator_right_pads():
    collate = SFTCollator(pad_token_id=7)
    batch = collate(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
            {"input_ids": [4], "attention_mask": [1], "labels": [4]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_collate_features_pads_only_the_keys_given():
    from rpsft.core.data import collate_features
    from rpsft.core.losses import IGNORE_INDEX

    features = [{"input_ids": [5, 6]}, {"input_ids": [1, 2, 3, 4]}]
    batch = collate_features(features, pad_token_id=0)
    assert list(batch) == ["input_ids"]
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    with_labels = collate_features(
        [{"input_ids": [9], "labels": [9]}, {"input_ids": [8, 8], "labels": [8, 8]}], 3
    )
    assert with_labels["labels"].tolist() == [[9, IGNORE_INDEX], [8, 8]]
    # the training collator is the same function with the tokenizer's pad token
    rows = [
        {"input_ids": [1], "attention_mask": [1], "labels": [1]},
        {"input_ids": [2, 2], "attention_mask": [1, 1], "labels": [2, 2]},
    ]
    assert all(torch.equal(SFTCollator(4)(rows)[k], v) for k, v in collate_features(rows, 4).items())


def test_collator_on_dataset(smol_tokenizer):
    dataset = build_sft_dataset(demo_math_examples(4, seed=0), smol_tokenizer, max_length=128)
    batch = SFTCollator(smol_tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths

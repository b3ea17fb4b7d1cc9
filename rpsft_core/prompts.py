"""Prompts (and optional reference replies) for the rank rule and the diagnostics, and their tokenization.

A :class:`PromptExample` is the prompt's chat messages (no final assistant turn) plus an optional reference
reply (``target``). Sources:

* the paper's evaluation rows (``shared/paper-data``): ``prompt`` (message list or string) with
  ``reward_model.ground_truth``; the reference reply is ``solution`` when the row has a string one (MATH-500,
  Minerva), else ``"The answer is \\boxed{<ground truth>}."``, else none (IFEval);
* SFT rows (``messages`` / ``prompt`` + ``response`` / ``problem`` + ``solution``): the last assistant turn is
  the reference reply;
* ``demo-math[:N]`` and ``hf:<id>[:split]`` through :func:`rpsft.core.data.load_examples`.

Gradient diagnostics (energy, first-order signal) score the reference reply (assistant tokens only, as SFT
does); a prompt without one is scored as plain language modelling over all its tokens. Hidden-state and
entropy diagnostics use the prompt alone, rendered with the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rpsft.core.chat import Messages
from rpsft.core.data import DataError, iter_jsonl, load_examples, parse_messages, tokenize_example


@dataclass
class PromptExample:
    messages: Messages  # the prompt: system/user (and earlier) turns, no final assistant reply
    target: str | None = None  # a reference reply, if the source has one

    def conversation(self) -> Messages:
        if not self.target:
            return list(self.messages)
        return [*self.messages, {"role": "assistant", "content": self.target}]


def _answer_text(ground_truth: Any) -> str | None:
    if isinstance(ground_truth, list):
        ground_truth = ", ".join(str(x) for x in ground_truth if str(x).strip())
    if ground_truth is None or not str(ground_truth).strip():
        return None
    return f"The answer is \\boxed{{{ground_truth}}}."


def row_to_prompt(row: Any, where: str) -> PromptExample:
    """One JSONL row (see the module docstring) -> :class:`PromptExample`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = parse_messages(row["messages"], where, "messages", text=True)
        if messages and messages[-1]["role"] == "assistant":
            return PromptExample(messages[:-1], messages[-1]["content"] or None)
        return PromptExample(messages)
    if "prompt" in row:
        messages = parse_messages(row["prompt"], where, "prompt", text=True)
        target = row.get("response")
        if not isinstance(target, str) or not target.strip():
            solution = row.get("solution")
            target = solution if isinstance(solution, str) and solution.strip() else None
        if target is None:
            target = _answer_text((row.get("reward_model") or {}).get("ground_truth"))
        return PromptExample(messages, target)
    if "problem" in row:
        solution = row.get("solution")
        return PromptExample(
            [{"role": "user", "content": str(row["problem"])}],
            solution if isinstance(solution, str) and solution.strip() else None,
        )
    raise DataError(f"{where}: no 'messages', 'prompt' or 'problem' field")


def read_prompt_examples(path: str | Path, limit: int | None = None) -> list[PromptExample]:
    """Read prompts from a JSONL file (first ``limit`` rows; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data: file {path} does not exist. Fix: pass an existing .jsonl file")
    examples: list[PromptExample] = []
    for where, row in iter_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(row_to_prompt(row, where))
    if not examples:
        raise DataError(f"data: {path} holds no rows")
    return examples


def load_prompt_examples(source: str | Path, limit: int | None = None) -> tuple[str, list[PromptExample]]:
    """``(dataset name, prompts)`` from a JSONL path, ``demo-math[:N]`` or ``hf:<id>[:split]``.

    The name is the file stem (``gpqa_test``) or the source string.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        return path.stem, read_prompt_examples(path, limit)
    return text, as_prompt_examples(load_examples(text, limit=limit))


def as_prompt_examples(items) -> list[PromptExample]:
    """Accept :class:`PromptExample` objects or chat conversations (message lists) and return prompts."""
    out: list[PromptExample] = []
    for item in items:
        if isinstance(item, PromptExample):
            out.append(item)
        elif isinstance(item, list):
            out.append(row_to_prompt({"messages": item}, "example"))
        elif isinstance(item, dict):
            out.append(row_to_prompt(item, "example"))
        else:
            raise TypeError(f"examples: expected PromptExample or message lists, got {type(item).__name__}")
    return out


# --------------------------------------------------------------------------------------------- tokenizing


def _render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def gradient_features(examples, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize for a scored loss: reference-reply tokens as labels, else every token (LM loss).

    Over-long sequences keep their *last* ``max_length`` tokens, so the scored reply survives truncation.
    """
    features = []
    for example in as_prompt_examples(examples):
        if example.target:
            item = tokenize_example(example.conversation(), tokenizer, max_length=1 << 30)
        else:
            text = _render(tokenizer, example.messages, add_generation_prompt=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            item = {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": list(ids)}
        if len(item["input_ids"]) > max_length:
            item = {key: value[-max_length:] for key, value in item.items()}
        features.append(item)
    return features


def prompt_token_ids(examples, tokenizer, max_length: int) -> list[list[int]]:
    """Prompt tokens with the generation prompt; over-long prompts keep their last ``max_length`` tokens."""
    out = []
    for example in as_prompt_examples(examples):
        text = _render(tokenizer, example.messages, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append(ids[-max_length:])
    return out


def pad_ids(
    ids: list[list[int]], pad_token_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded on ``side``."""
    width = max(len(x) for x in ids)
    rows, masks = [], []
    for x in ids:
        pad = [int(pad_token_id)] * (width - len(x))
        rows.append(x + pad if side == "right" else pad + x)
        ones, zeros = [1] * len(x), [0] * (width - len(x))
        masks.append(ones + zeros if side == "right" else zeros + ones)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]

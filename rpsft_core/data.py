"""SFT data: chat-format JSONL (or demo / hub data) -> tokenized examples with assistant-only labels.

Accepted row formats (JSONL lines or dataset rows), checked in this order:

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``{"prompt": str | [messages], "response": str}``  (the paper data's ``prompt`` is a message list)
* ``{"problem": str, "solution": str}``  (OpenR1-Math style)

Sources (:func:`load_examples`): JSONL files, ``demo-math[:N]``, ``champ[:split[:N]]`` (CHAMP competition
problems with human-written solutions, offline; see :mod:`rpsft.core.math_data`), ``hf:<id>[:split]``.

Labels are ``-100`` everywhere except the assistant turns: their content and the turn-closing token(s)
the chat template emits after it (e.g. ``<|im_end|>``), never the ``<|im_start|>assistant\\n`` header.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from rpsft.core.chat import MATH_SYSTEM_PROMPT, Messages
from rpsft.core.errors import DataError
from rpsft.core.losses import IGNORE_INDEX
from rpsft.core.math_data import load_champ
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
DEMO_MATH_DEFAULT_N = 512

_SOURCE_FORMS = (
    "'path/to/file.jsonl' (one JSON object per line), "
    "'demo-math' or 'demo-math:N' (N offline generated math problems, default 512), "
    "'champ', 'champ:<split>' or 'champ:<split>:<N>' (CHAMP competition problems with worked solutions, "
    "offline; split train, heldout or all, default train; the first N), "
    "'hf:<dataset_id>[:<split>]' (a Hugging Face hub dataset, split defaults to 'train')"
)
_ROW_FORMS = (
    'each row needs "messages": [{"role": ..., "content": ...}], or "prompt" (string or message list) '
    'with "response" (string), or "problem" with "solution" (strings)'
)


# --------------------------------------------------------------------------------------------- reading


def parse_messages(
    value: Any,
    where: str,
    field: str,
    *,
    text: bool = False,
    error: type[Exception] = DataError,
    formats: str = _ROW_FORMS,
) -> Messages:
    """A chat message list read from a row's ``field``: a non-empty list of ``{"role", "content"}`` objects
    (roles system, user, assistant; string content), or with ``text=True`` also a plain string, which becomes
    one user message. The one reader of the chat formats; errors (of type ``error``) name ``where``, the field
    and the message position (``formats``: the accepted forms a wrong type's fix names)."""
    if text and isinstance(value, str):
        if not value.strip():
            raise error(f"{where}: {field!r} is empty. Fix: give the text, or a list of chat messages.")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise error(
            f"{where}: {field!r} must be {'a string or ' if text else ''}a non-empty list of {{'role', 'content'}} "
            f"objects, got {type(value).__name__}. Fix: {formats}."
        )
    out: Messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise error(
                f"{where}: {field}[{k}] must be an object with 'role' and 'content', got {message!r:.80}. "
                f'Fix: write each message as {{"role": "user", "content": "..."}}.'
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise error(
                f"{where}: {field}[{k}] has role {role!r}, which is not one of {', '.join(ROLES)}. "
                "Fix: use only the roles system, user and assistant."
            )
        if not isinstance(content, str):
            raise error(
                f"{where}: {field}[{k}] ({role}) has content of type {type(content).__name__}, not a string. "
                "Fix: make every message content a plain string."
            )
        out.append({"role": role, "content": content})
    return out


def _require_string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        what = "is missing" if key not in row else f"is a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} {what}. Fix: {_ROW_FORMS}.")
    return value


def row_to_messages(row: Any, where: str) -> Messages:
    """Convert one data row (see the module docstring) to chat messages; errors name ``where``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}. Fix: {_ROW_FORMS}.")
    if row.get("messages") is not None:
        messages = parse_messages(row["messages"], where, "messages")
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = parse_messages(prompt, where, "prompt")
        messages.append({"role": "assistant", "content": _require_string(row, "response", where)})
    elif "problem" in row:
        messages = [
            {"role": "user", "content": _require_string(row, "problem", where)},
            {"role": "assistant", "content": _require_string(row, "solution", where)},
        ]
    else:
        raise DataError(f"{where}: no 'messages', 'prompt' or 'problem' field. Fix: {_ROW_FORMS}.")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(
            f"{where}: no assistant message with non-empty content, so there is nothing to train on. "
            "Fix: add the target reply as an assistant message (or a non-empty 'response')."
        )
    return messages


def iter_jsonl(
    path: str | Path, *, error: type[Exception] = DataError, label: str = ""
) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` per non-blank line, ``where`` = ``"[label: ]path:lineno"``.

    Invalid JSON raises ``error`` naming the file and line.
    """
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{label}: {path}:{lineno}" if label else f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}). "
                    "Fix: write exactly one JSON object per line."
                ) from None
            yield where, row


def read_jsonl_examples(path: str | Path) -> list[Messages]:
    """Read a chat-format JSONL file (blank lines skipped) into a list of message lists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data: file {path} does not exist (or is not a file). Fix: pass the path of an existing "
            f".jsonl file, or one of the other data sources: {_SOURCE_FORMS}."
        )
    return [row_to_messages(row, where) for where, row in iter_jsonl(path)]


def write_jsonl(path: str | Path, examples: Iterable[Messages]) -> None:
    """Write examples as ``{"messages": [...]}`` lines (creates parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for messages in examples:
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------- demo math


def _factorial_work(n: int, ans: str) -> str:
    if n < 2:
        return f"{n}! = {ans} by definition."
    product = " \\times ".join(str(k) for k in range(1, n + 1))
    return f"{n}! = {product} = {ans}."


def _lcm_work(x: int, y: int, ans: str) -> str:
    g = math.gcd(x, y)
    return f"gcd({x}, {y}) = {g}, so lcm({x}, {y}) = {x} \\times {y} / {g} = {ans}."


def _p(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


# mathgenerator generator name -> (how many integers its problem text holds,
#   (those integers, answer) -> (question, short worked answer before the box)).
# The answer is mathgenerator's own solution; the integers are read from its problem text.
_DemoFormat = Callable[[list[int], str], tuple[str, str]]
_DEMO_FORMATS: dict[str, tuple[int, _DemoFormat]] = {
    "addition": (2, lambda n, a: (f"What is {n[0]} + {n[1]}?", f"{n[0]} + {n[1]} = {a}.")),
    "subtraction": (2, lambda n, a: (f"What is {n[0]} - {n[1]}?", f"{n[0]} - {n[1]} = {a}.")),
    "multiplication": (2, lambda n, a: (f"What is {n[0]} \\times {n[1]}?", f"{n[0]} \\times {n[1]} = {a}.")),
    "division": (
        2,
        lambda n, a: (
            f"What is {n[0]} \\div {n[1]}?",
            f"{a} \\times {n[1]} = {n[0]}, so {n[0]} \\div {n[1]} = {a}.",
        ),
    ),
    "square": (2, lambda n, a: (f"What is {n[0]}^2?", f"{n[0]}^2 = {n[0]} \\times {n[0]} = {a}.")),
    "square_root": (
        1,
        lambda n, a: (f"What is \\sqrt{{{n[0]}}}?", f"{a} \\times {a} = {n[0]}, so \\sqrt{{{n[0]}}} = {a}."),
    ),
    "gcd": (
        2,
        lambda n, a: (
            f"Find the greatest common divisor of {n[0]} and {n[1]}.",
            f"The largest number dividing both {n[0]} and {n[1]} is {a}.",
        ),
    ),
    "lcm": (
        2,
        lambda n, a: (f"Find the least common multiple of {n[0]} and {n[1]}.", _lcm_work(n[0], n[1], a)),
    ),
    "basic_algebra": (
        3,
        lambda n, a: (
            f"Solve for x: {n[0]}x + {n[1]} = {n[2]}.",
            f"{n[0]}x = {n[2]} - {n[1]} = {n[2] - n[1]}, so x = {a}.",
        ),
    ),
    "factorial": (1, lambda n, a: (f"What is {n[0]}!?", _factorial_work(n[0], a))),
    "absolute_difference": (
        2,
        lambda n, a: (
            f"What is |{n[0]} - {_p(n[1])}|?",
            f"{n[0]} - {_p(n[1])} = {n[0] - n[1]}, whose absolute value is {a}.",
        ),
    ),
    "third_angle_of_triangle": (
        2,
        lambda n, a: (
            f"Two angles of a triangle are {n[0]} and {n[1]} degrees. What is the third angle in degrees?",
            f"The angles sum to 180, so 180 - {n[0]} - {n[1]} = {a}.",
        ),
    ),
    "sum_of_polygon_angles": (
        1,
        lambda n, a: (
            f"What is the sum of the interior angles, in degrees, of a polygon with {n[0]} sides?",
            f"The sum is ({n[0]} - 2) \\times 180 = {a}.",
        ),
    ),
}


# An integer; a "-" right after a digit is a binary minus ("-94-66" holds -94 and 66), not a sign.
_INT_RE = re.compile(r"(?<!\d)-?\d+")


def _strip_math(text: str) -> str:
    return text.replace("$", "").strip().rstrip("=").strip()


def demo_math_examples(n: int, seed: int = 0) -> list[Messages]:
    """``n`` short offline math SFT examples from ``mathgenerator``, deterministic in ``seed``.

    ``mathgenerator`` draws from the module-level ``random``; its state is saved and restored, so the
    caller's global random stream is left untouched.
    """
    if n < 0:
        raise DataError(f"data: demo-math needs a non-negative number of examples, got {n}. Fix: use N >= 0.")
    try:
        import mathgenerator
    except ImportError as err:  # pragma: no cover - declared dependency
        raise DataError(
            f"data: demo-math needs the package mathgenerator ({err}). Fix: pip install mathgenerator"
        ) from err
    names = sorted(_DEMO_FORMATS)
    state = random.getstate()
    try:
        random.seed(seed)
        examples: list[Messages] = []
        for _ in range(n):
            name = random.choice(names)
            problem, solution = getattr(mathgenerator, name)()
            count, fmt = _DEMO_FORMATS[name]
            numbers = [int(x) for x in _INT_RE.findall(str(problem))]
            if len(numbers) != count:
                raise DataError(
                    f"data: mathgenerator's {name!r} produced {problem!r}, not the expected format "
                    f"({count} integer(s)). Fix: install mathgenerator==1.5.0."
                )
            answer = _strip_math(str(solution))
            question, work = fmt(numbers, answer)
            examples.append(
                [
                    {"role": "system", "content": MATH_SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"{work} The answer is \\boxed{{{answer}}}."},
                ]
            )
    finally:
        random.setstate(state)
    return examples


# --------------------------------------------------------------------------------------------- sources


def hf_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of the hub dataset ``<dataset_id>[:<split>]`` (default split train)."""
    dataset_id, _, split = spec.partition(":")
    split = split or "train"
    if not dataset_id:
        raise DataError(f"data: 'hf:{spec}' names no dataset. Fix: use 'hf:<dataset_id>[:<split>]'.")
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - declared dependency
        raise DataError(
            f"data: hub datasets need the package datasets ({err}). Fix: pip install datasets"
        ) from err
    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # the hub client raises many different types
        raise DataError(
            f"data: could not load hub dataset {dataset_id!r} split {split!r}: {type(err).__name__}: {err}. "
            "Fix: check the dataset id and split, your network / HF_HUB_OFFLINE setting and hub login, "
            "or export the data to a local .jsonl file."
        ) from err
    for i, row in enumerate(rows):
        yield f"hf:{dataset_id}[{split}] row {i}", row


def _load_hf(spec: str, limit: int | None) -> list[Messages]:
    examples: list[Messages] = []
    for where, row in hf_rows(spec):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(row_to_messages(row, where))
    return examples


def load_examples(source: str, *, limit: int | None = None, seed: int = 0) -> list[Messages]:
    """Load SFT examples from a JSONL path, ``demo-math[:N]``, ``champ[:split[:N]]`` or ``hf:<id>[:<split>]``.

    ``limit`` keeps the first ``limit`` examples; ``seed`` only affects ``demo-math``.
    """
    if limit is not None and limit < 0:
        raise DataError(f"data: limit must be >= 0 or None, got {limit}. Fix: pass a non-negative limit.")
    source = str(source)
    if source.startswith("hf:"):
        return _load_hf(source[len("hf:") :], limit)
    if source == "demo-math" or source.startswith("demo-math:"):
        count_text = source[len("demo-math:") :] if ":" in source else ""
        if count_text and not count_text.isdigit():
            raise DataError(
                f"data: {source!r}: {count_text!r} is not a number of examples. Fix: use e.g. 'demo-math:256'."
            )
        n = int(count_text) if count_text else DEMO_MATH_DEFAULT_N
        if limit is not None:
            n = min(n, limit)
        return demo_math_examples(n, seed)
    if source == "champ" or source.startswith("champ:"):
        return load_champ(source, limit)
    if source.lower().endswith(".jsonl") or Path(source).is_file():
        examples = read_jsonl_examples(source)
        return examples if limit is None else examples[:limit]
    raise DataError(f"data: unknown data source {source!r}. Fix: use one of {_SOURCE_FORMS}.")


# --------------------------------------------------------------------------------------------- tokenizing


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja / template errors come in many types
        raise DataError(
            f"data: the tokenizer's chat template failed on a conversation of {len(messages)} message(s): "
            f"{type(err).__name__}: {err}. Fix: check the roles/order of the messages or set a chat template "
            "that supports them."
        ) from err
    if not isinstance(text, str):
        raise DataError(
            f"data: apply_chat_template(tokenize=False) returned {type(text).__name__}, not a string. "
            "Fix: use a tokenizer whose chat template renders to text."
        )
    return text


def _assistant_char_spans(messages: Messages, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the character span of every assistant turn (prefix method)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"data: the chat template is not prefix-stable at message {i} (assistant): rendering the "
                "conversation up to a turn is not a prefix of rendering it further (templates that rewrite "
                "earlier turns, e.g. strip reasoning from past assistant messages, do this), so the assistant "
                "tokens cannot be located. Fix: use a prefix-stable chat template, or train on single-turn "
                "examples."
            )
        start, end = len(before), len(through)
        # The whitespace separating turns (e.g. "\n" after "<|im_end|>") is not part of the turn.
        while end > start and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_example(messages: Messages, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Tokenize one conversation: ``input_ids``, ``attention_mask``, ``labels`` (assistant turns only).

    Right-truncates to ``max_length``; the result may have no trainable label (see ``build_sft_dataset``).
    """
    if max_length < 1:
        raise DataError(f"data: max_length must be >= 1, got {max_length}. Fix: pass a positive max_length.")
    text, spans = _assistant_char_spans(messages, tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        in_span = [
            any(s < span_end and e > span_start for span_start, span_end in spans)
            for s, e in enc["offset_mapping"]
        ]
    except NotImplementedError:
        # Tokenizers without offsets: tokenize the pieces between span boundaries separately.
        input_ids, in_span = [], []
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        for lo, hi in itertools.pairwise(cuts):
            ids = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
            input_ids += ids
            in_span += [any(s <= lo and hi <= e for s, e in spans)] * len(ids)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, in_span)]
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class SFTDataset(Dataset):
    """Tokenized SFT examples; ``n_dropped`` counts examples with no trainable label after truncation."""

    def __init__(self, items: list[dict[str, list[int]]], n_dropped: int = 0) -> None:
        self.items = items
        self.n_dropped = n_dropped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


def build_sft_dataset(examples: list[Messages], tokenizer: Any, max_length: int) -> SFTDataset:
    """Tokenize all examples, dropping (and counting) those whose assistant part was truncated away."""
    items: list[dict[str, list[int]]] = []
    n_dropped = 0
    for messages in examples:
        item = tokenize_example(messages, tokenizer, max_length)
        if all(label == IGNORE_INDEX for label in item["labels"]):
            n_dropped += 1
        else:
            items.append(item)
    if n_dropped:
        logger.warning(
            "data: dropped %d of %d examples with no assistant token left after truncation to "
            "max_length=%d (raise max_length to keep them)",
            n_dropped,
            len(examples),
            max_length,
        )
    if not items:
        raise DataError(
            f"data: no trainable examples: {len(examples)} example(s) given, {n_dropped} dropped because no "
            f"assistant token is left after truncation to max_length={max_length}. Fix: provide examples with "
            "assistant replies and/or raise max_length."
        )
    return SFTDataset(items, n_dropped)


def collate_features(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized features into a batch of ``torch.long`` tensors: ``input_ids`` with
    ``pad_token_id``, and where the features have them ``attention_mask`` with 0 and ``labels`` with
    ``IGNORE_INDEX``. The one collator of the package (training, loss metrics, multiple-choice scoring)."""
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": int(pad_token_id), "attention_mask": 0, "labels": IGNORE_INDEX}
    return {
        key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long)
        for key, pad in pads.items()
        if key in features[0]
    }


class SFTCollator:
    """:func:`collate_features` with the tokenizer's pad token, as a ``Trainer``'s ``data_collator``."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise DataError("data: SFTCollator needs a pad_token_id, got None. Fix: set tokenizer.pad_token.")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate_features(features, self.pad_token_id)

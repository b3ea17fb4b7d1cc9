"""Read and validate benchmark items: local JSONL in the paper-data format, or a hub dataset.

Paper-data row (``shared/paper-data/README.md``)::

    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "reward_model": {"ground_truth": "540" | 27 | ["$2n$"] | "C" | "",
                      "instructions": [{"instruction_id": ..., "kwargs": {...}}]},   # IFEval only
     "solution": "..." | ["..."], "unit": "km" | null, "is_multiple_answer": bool}     # optional

``prompt`` may also be a plain string (the user message). Every row is checked before any model is loaded; an
error names the file, the line, the field and the fix. Items become flat "docs" (strings, ints, bools) that
lm-eval's tasks read; the chat messages are split into ``system`` (may be empty) and ``user``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from rpsft.core.data import iter_jsonl, parse_messages
from rpsft.evaluation.answers import normalize_gold, parse_choices
from rpsft.evaluation.benchmarks import MC_INSTRUCTION, Benchmark, EvalConfigError

_PROMPT_FORMS = 'the question text, or "prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]'


class EvalDataError(EvalConfigError):
    """A missing or malformed benchmark file or row."""


@dataclass
class Item:
    """One benchmark item, flattened for lm-eval (every field a str, int or bool)."""

    benchmark: str
    index: int
    scorer: str
    system: str
    user: str
    target: str  # math: the reference as one string; mc: the letter; ifeval: ""
    ground_truth: str  # JSON of the raw reference (str, number or list)
    choices: str = "{}"  # JSON {letter: text}
    unit: str = ""
    multiple: bool = False
    instruction_ids: str = "[]"  # JSON list
    instruction_kwargs: str = "[]"  # JSON list of dicts
    solution: str = ""
    repeats: int = 1  # rows of the file that carry this prompt (an avg@n file repeats each prompt n times)
    pass_k: int = 0  # filled by the task loader: the k of pass@k (0 = number of samples)

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        return [*out, {"role": "user", "content": self.user}]

    def doc(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ file location


def resolve_file(bench: Benchmark, data_dir: str | Path | None, subset: str = "full") -> Path | None:
    """The JSONL file of ``bench`` under ``data_dir`` (``None`` when reading from the hub)."""
    if data_dir is None:
        if bench.hub is None:
            raise EvalDataError(
                f"{bench.name}: no data dir given and the benchmark has no hub source. Fix: pass --data-dir "
                f"(a directory holding {bench.file}), e.g. --data-dir ../shared/paper-data"
            )
        return None
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise EvalDataError(
            f"data_dir: {root} does not exist or is not a directory. Fix: pass the directory that holds "
            "id/*.jsonl and ood/*.jsonl (e.g. --data-dir ../shared/paper-data), or omit it to read the hub"
        )
    name = bench.source_file(subset)
    if name is None:
        raise EvalDataError(
            f"{bench.name}: the benchmark has no 'file' entry, so it cannot be read from data dir {root}. "
            "Fix: add 'file: <relative path>.jsonl' to its entry, or omit --data-dir to read the hub"
        )
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        hub_hint = f", or omit --data-dir to read the hub ({bench.hub.path})" if bench.hub else ""
        raise EvalDataError(
            f"{bench.name}: file {name} not found in data dir {root}. Fix: add the file (paper-data JSONL "
            f"format), leave the benchmark out (--exclude {bench.name}){hub_hint}"
        )
    return path


# ---------------------------------------------------------------------------------------------- parsing


def _split_prompt(prompt: Any, where: str) -> tuple[str, str]:
    """``(system, user)`` of a row's ``prompt`` (read by :func:`rpsft.core.data.parse_messages`): optional
    system messages, then one user message."""
    messages = parse_messages(prompt, where, "prompt", text=True, error=EvalDataError, formats=_PROMPT_FORMS)
    system_parts: list[str] = []
    user: str | None = None
    for k, message in enumerate(messages):
        role = message["role"]
        if role == "system" and user is None:
            system_parts.append(message["content"])
        elif role == "user" and user is None:
            user = message["content"]
        else:
            raise EvalDataError(
                f"{where}: prompt[{k}] has role {role!r}; an evaluation prompt is an optional system message "
                "followed by one user message. Fix: put the question in a single user message"
            )
    if user is None or not user.strip():
        raise EvalDataError(f"{where}: 'prompt' has no user message. Fix: add {{'role': 'user', ...}}")
    return "\n\n".join(system_parts), user


def _first_solution(solution: Any) -> str:
    if isinstance(solution, list):
        solution = next((s for s in solution if isinstance(s, str) and s.strip()), "")
    return solution if isinstance(solution, str) else ""


def _gold_present(gt: Any) -> bool:
    if gt is None or isinstance(gt, bool):
        return False
    if isinstance(gt, (int, float)):
        return True
    if isinstance(gt, str):
        return bool(gt.strip())
    if isinstance(gt, list):
        return bool(gt) and all(_gold_present(g) for g in gt)
    return False


def make_item(
    bench: Benchmark,
    index: int,
    where: str,
    system: str,
    user: str,
    ground_truth: Any,
    *,
    instructions: Any = None,
    unit: Any = None,
    multiple: Any = None,
    solution: Any = None,
) -> Item:
    """Validate one item's fields for the benchmark's scorer and build it."""
    item = Item(
        benchmark=bench.name,
        index=index,
        scorer=bench.scorer,
        system=system,
        user=user,
        target="",
        ground_truth=json.dumps(ground_truth),
        unit=unit.strip() if isinstance(unit, str) else "",
        multiple=bool(multiple),
        solution=_first_solution(solution),
    )
    if bench.scorer == "ifeval":
        if not isinstance(instructions, list) or not instructions:
            raise EvalDataError(
                f"{where}: IFEval row without instructions ('reward_model.instructions' is missing or empty). "
                'Fix: "instructions": [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]'
            )
        ids, kwargs = [], []
        for k, ins in enumerate(instructions):
            if not isinstance(ins, dict) or not isinstance(ins.get("instruction_id"), str):
                raise EvalDataError(
                    f"{where}: reward_model.instructions[{k}] needs a string 'instruction_id'. "
                    'Fix: {"instruction_id": "punctuation:no_comma", "kwargs": {}}'
                )
            ids.append(ins["instruction_id"])
            kwargs.append(ins.get("kwargs") or {})
        item.instruction_ids, item.instruction_kwargs = json.dumps(ids), json.dumps(kwargs)
        return item
    if not _gold_present(ground_truth):
        raise EvalDataError(
            f"{where}: row without a ground truth ('reward_model.ground_truth' is missing or empty). "
            'Fix: add the reference answer, e.g. "reward_model": {"ground_truth": "42"}'
        )
    if bench.scorer == "math":
        try:
            item.target = normalize_gold(ground_truth)
        except ValueError as exc:
            raise EvalDataError(f"{where}: reward_model.ground_truth: {exc}. Fix: a string answer") from None
        if isinstance(ground_truth, list) and len(ground_truth) > 1:
            item.multiple = True
        return item
    # multiple choice
    choices = parse_choices(user)
    if not choices:
        raise EvalDataError(
            f"{where}: no options found in the user message. Fix: list the options one per line as "
            "'A. ...', 'B. ...'"
        )
    letter = str(ground_truth).strip().upper()
    if letter not in choices:
        raise EvalDataError(
            f"{where}: ground truth {ground_truth!r} is not one of the option letters {''.join(choices)}. "
            "Fix: give the correct option's letter"
        )
    item.target, item.choices = letter, json.dumps(choices)
    return item


def _row_to_item(bench: Benchmark, row: Any, index: int, where: str) -> Item:
    if not isinstance(row, dict):
        raise EvalDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise EvalDataError(
            f'{where}: row has no \'prompt\'. Fix: "prompt": [{{"role": "user", "content": "..."}}]'
        )
    system, user = _split_prompt(row["prompt"], where)
    reward = row.get("reward_model")
    if reward is None:
        reward = {}
    if not isinstance(reward, dict):
        raise EvalDataError(f"{where}: 'reward_model' must be an object with 'ground_truth'")
    return make_item(
        bench,
        index,
        where,
        system,
        user,
        reward.get("ground_truth"),
        instructions=reward.get("instructions"),
        unit=row.get("unit"),
        multiple=row.get("is_multiple_answer"),
        solution=row.get("solution"),
    )


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=64)
def _read_jsonl_cached(bench_json: str, path: str, mtime_ns: int, size: int) -> tuple[Item, ...]:
    bench = Benchmark.model_validate_json(bench_json)
    items: list[Item] = []
    for where, row in iter_jsonl(path, error=EvalDataError, label=bench.name):
        items.append(_row_to_item(bench, row, len(items), where))
    if not items:
        raise EvalDataError(f"{bench.name}: {path} has no rows. Fix: one JSON object per line")
    return tuple(collapse_repeats(bench, items))


_REFERENCE_FIELDS = ("ground_truth", "target", "choices", "instruction_ids", "instruction_kwargs", "unit")


def collapse_repeats(bench: Benchmark, items: list[Item]) -> list[Item]:
    """Rows that repeat an earlier row (the same prompt and the same reference) are one item: the form some
    releases use for avg@n (N problems x n identical rows), and duplicates a benchmark may hold by accident. The
    item keeps its first row and counts the rows in ``repeats``; items are numbered in order of first appearance.
    Rows with the same prompt but another reference stay separate items."""
    groups: dict[tuple[str, ...], list[Item]] = {}
    for item in items:
        key = (item.system, item.user, *(str(getattr(item, f)) for f in _REFERENCE_FIELDS))
        groups.setdefault(key, []).append(item)
    if len(groups) == len(items):
        return items
    return [replace(rows[0], index=index, repeats=len(rows)) for index, rows in enumerate(groups.values())]


def read_jsonl_items(bench: Benchmark, path: str | Path) -> list[Item]:
    path = Path(path)
    stat = path.stat()
    return list(_read_jsonl_cached(bench.model_dump_json(), str(path), stat.st_mtime_ns, stat.st_size))


# -------------------------------------------------------------------------------------------------- hub


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _hub_row_to_item(bench: Benchmark, row: dict[str, Any], index: int, where: str) -> Item:
    hub = bench.hub
    assert hub is not None
    try:
        question = _get(row, hub.question)
        answer = _get(row, hub.answer) if hub.answer else None
        if isinstance(hub.choices, list):
            options = [_get(row, f) for f in hub.choices]
        elif hub.choices:
            options = list(_get(row, hub.choices))
        else:
            options = None
        unit = _get(row, hub.unit) if hub.unit else None
        solution = _get(row, hub.solution) if hub.solution else None
        ids = _get(row, hub.instruction_ids) if hub.instruction_ids else None
        kwargs = _get(row, hub.instruction_kwargs) if hub.instruction_kwargs else None
    except KeyError as exc:
        raise EvalDataError(
            f"{where}: hub row has no field {exc.args[0]!r} (fields: {sorted(row)}). Fix: correct the "
            f"benchmark's hub field mapping for {hub.path}"
        ) from None
    user = str(question)
    instructions = None
    if bench.scorer == "mc":
        if not options:
            raise EvalDataError(
                f"{where}: no options in field {hub.choices!r}. Fix: the hub 'choices' mapping"
            )
        correct: int | None = None
        if hub.answer_format == "first":
            correct = 0
        elif hub.answer_format == "index":
            correct = int(answer)
        elif hub.answer_format == "onehot":
            correct = list(answer).index(1) if 1 in list(answer) else None
        elif hub.answer_format == "letter" and isinstance(answer, str) and len(answer.strip()) == 1:
            correct = ord(answer.strip().upper()) - ord("A")
        order = list(range(len(options)))
        if hub.shuffle_choices:
            random.Random(f"{bench.name}:{index}").shuffle(order)
        options = [options[i] for i in order]
        letters = [chr(ord("A") + i) for i in range(len(options))]
        answer = letters[order.index(correct)] if correct is not None and 0 <= correct < len(order) else None
        listing = "\n".join(f"{letter}. {str(text).strip()}" for letter, text in zip(letters, options))
        user = f"{user}\n\nChoices:\n{listing}\n\n{MC_INSTRUCTION}"
    elif bench.scorer == "ifeval":
        instructions = [
            {"instruction_id": i, "kwargs": k} for i, k in zip(ids or [], kwargs or [{}] * len(ids or []))
        ]
    return make_item(
        bench,
        index,
        where,
        hub.system_prompt,
        user,
        answer,
        instructions=instructions,
        unit=unit,
        solution=solution,
        multiple=isinstance(answer, list) and len(answer) > 1,
    )


@lru_cache(maxsize=32)
def _read_hub_cached(bench_json: str) -> tuple[Item, ...]:
    bench = Benchmark.model_validate_json(bench_json)
    hub = bench.hub
    assert hub is not None
    import datasets

    try:
        dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as exc:  # network, auth, missing split: many exception types
        raise EvalDataError(
            f"{bench.name}: could not load hub dataset {hub.path!r} (config {hub.name!r}, split {hub.split!r}): "
            f"{type(exc).__name__}: {str(exc)[:300]}. Fix: pass --data-dir with the JSONL files, or allow hub "
            "access (unset HF_DATASETS_OFFLINE / log in for gated sets)"
        ) from None
    items = [
        _hub_row_to_item(bench, dict(row), i, f"{bench.name}: hub {hub.path} row {i}")
        for i, row in enumerate(dataset)
    ]
    return tuple(collapse_repeats(bench, items))


# ------------------------------------------------------------------------------------------------ public


def load_items(
    bench: Benchmark, data_dir: str | Path | None = None, subset: str = "full", limit: int | None = None
) -> list[Item]:
    """All items of a benchmark (validated; rows with the same prompt are one item, see
    :func:`collapse_repeats`), or the first ``limit``."""
    path = resolve_file(bench, data_dir, subset)
    items = (
        read_jsonl_items(bench, path) if path is not None else list(_read_hub_cached(bench.model_dump_json()))
    )
    return items[:limit] if limit is not None else items


def source_digest(bench: Benchmark, data_dir: str | Path | None, subset: str = "full") -> str:
    """What identifies the data read: the file's sha256, or the hub path/config/split."""
    path = resolve_file(bench, data_dir, subset)
    if path is None:
        assert bench.hub is not None
        return f"hub:{bench.hub.path}:{bench.hub.name}:{bench.hub.split}"
    return "sha256:" + _file_digest(path)

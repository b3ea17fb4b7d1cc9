"""Offline math SFT data from CHAMP, and a format-generic guard against train/eval overlap.

**CHAMP** (PyPI ``champ-dataset``, MIT licence): 270 competition problems (combinatorics, inequalities,
number theory, polynomials, sequences) with human-written step-by-step solutions and final answers, read
from the package's ``champ_dataset/dataset_files/v0.json`` (the package's Python code is not run).

* Source specs: ``champ`` (= ``champ:train``), ``champ:<split>``, ``champ:<split>:<N>`` (the first N),
  splits ``train`` (~90%), ``heldout`` (~10%), ``all``.
* Split: a problem is ``heldout`` when the first 8 bytes of ``sha256("champ-split:" + identifier)``,
  as a big-endian integer, are ``< 10`` mod 100; otherwise ``train``. Order within a split: by
  ``sha256("champ-order:" + identifier)`` (a fixed, category-mixed order, so the first N of a split are a
  mix of all categories). Neither depends on Python's hash seed or on the order of the JSON file.
* Rendering: system = :data:`~rpsft.core.chat.MATH_SYSTEM_PROMPT` (the paper data's system prompt),
  user = the problem (CHAMP ``_text``), assistant = the solution steps (their ``_text``), one per line,
  then ``The final answer is $\\boxed{<answer>}$.`` with CHAMP's ``_answer`` verbatim. CHAMP writes its
  math as plain text (``sqrt(3)/3``, ``x_(n+1)``, ``≤``), not LaTeX, and about half of its answers contain
  prose (``No``, ``0 is the only possible value``, ``The limit exists and is equal to 3``,
  ``C(10, 5), or equivalently 252``); they are boxed verbatim too, so the box holds exactly the dataset's
  answer. No CHAMP answer contains ``$`` or an unbalanced brace (checked when the data is read).

**Overlap guard**: :func:`find_overlap` compares the user turns of any training examples with any
evaluation prompts (normalized exact match, plus word 8-gram containment).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rpsft.core.chat import MATH_SYSTEM_PROMPT, Messages
from rpsft.core.errors import DataError

CHAMP_PACKAGE = "champ_dataset"
CHAMP_RESOURCE = ("dataset_files", "v0.json")
CHAMP_SPLITS = ("train", "heldout", "all")
CHAMP_DEFAULT_SPLIT = "train"
CHAMP_HELDOUT_PERCENT = 10

_CHAMP_FORMS = (
    "'champ' (the train split), 'champ:<split>' or 'champ:<split>:<N>' (the first N problems of the split), "
    "with <split> one of train, heldout, all"
)
_CHAMP_FIX = "Fix: pip install 'champ-dataset>=1.0' (the data is its champ_dataset/dataset_files/v0.json)"


@dataclass(frozen=True)
class ChampProblem:
    """One CHAMP problem: the fields the SFT rendering uses."""

    identifier: str
    category: str
    problem: str
    steps: tuple[str, ...]
    answer: str


# --------------------------------------------------------------------------------------------- reading


def _champ_json_text() -> str:
    """Text of CHAMP's v0.json via importlib.resources, without executing the package's ``__init__``."""
    spec = importlib.util.find_spec(CHAMP_PACKAGE)
    if spec is None or spec.loader is None:
        raise DataError(
            f"data: the champ source needs the package champ-dataset, which is not installed. {_CHAMP_FIX}."
        )
    get_reader = getattr(spec.loader, "get_resource_reader", None)
    reader = get_reader(spec.name) if get_reader is not None else None
    files = getattr(reader, "files", None)
    root = files() if files is not None else importlib.resources.files(CHAMP_PACKAGE)
    resource = root
    for part in CHAMP_RESOURCE:
        resource = resource / part
    try:
        return resource.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(
            f"data: could not read {CHAMP_PACKAGE}/{'/'.join(CHAMP_RESOURCE)} from champ-dataset: {err}. "
            f"{_CHAMP_FIX}."
        ) from err


def _balanced_braces(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _parse_problem(key: str, raw: object) -> ChampProblem:
    where = f"data: champ problem {key!r}"
    fix = "Fix: reinstall champ-dataset (pip install --force-reinstall 'champ-dataset>=1.0')."
    if not isinstance(raw, dict):
        raise DataError(f"{where} is a {type(raw).__name__}, not an object. {fix}")

    def text(value: object, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {field!r} is not a non-empty string. {fix}")
        return value.strip()

    steps_raw = raw.get("solution", {}).get("steps") if isinstance(raw.get("solution"), dict) else None
    if not isinstance(steps_raw, list) or not steps_raw:
        raise DataError(f"{where}: field 'solution.steps' is not a non-empty list. {fix}")
    steps = tuple(
        text(step.get("_text") if isinstance(step, dict) else None, f"solution.steps[{i}]._text")
        for i, step in enumerate(steps_raw)
    )
    answer = text(raw.get("_answer"), "_answer")
    if "$" in answer or not _balanced_braces(answer):
        raise DataError(
            f"{where}: answer {answer!r} contains '$' or unbalanced braces, so it cannot be boxed as is. {fix}"
        )
    if any("\\boxed" in step for step in steps):
        raise DataError(f"{where}: a solution step already contains \\boxed. {fix}")
    identifier = text(raw.get("identifier", key), "identifier")
    return ChampProblem(
        identifier=identifier,
        category=text(raw.get("category"), "category"),
        problem=text(raw.get("_text"), "_text"),
        steps=steps,
        answer=answer,
    )


@functools.lru_cache(maxsize=1)
def champ_problems() -> tuple[ChampProblem, ...]:
    """All CHAMP problems (parsed once per process; the file is 72 MB, mostly model transcripts)."""
    try:
        data = json.loads(_champ_json_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"data: champ-dataset's v0.json is not valid JSON ({err.msg}). {_CHAMP_FIX}."
        ) from None
    problems = data.get("problems") if isinstance(data, dict) else None
    if not isinstance(problems, dict) or not problems:
        raise DataError(f"data: champ-dataset's v0.json has no 'problems' object. {_CHAMP_FIX}.")
    parsed = tuple(_parse_problem(key, raw) for key, raw in problems.items())
    identifiers = [p.identifier for p in parsed]
    if len(set(identifiers)) != len(identifiers):
        raise DataError(f"data: champ-dataset's v0.json has duplicate identifiers. {_CHAMP_FIX}.")
    return parsed


# --------------------------------------------------------------------------------------------- split


def _digest(prefix: str, identifier: str) -> bytes:
    return hashlib.sha256(f"{prefix}:{identifier}".encode()).digest()


def champ_split_of(identifier: str) -> str:
    """``"heldout"`` for ~10% of identifiers, else ``"train"``: a pure function of the identifier (sha256)."""
    bucket = int.from_bytes(_digest("champ-split", identifier)[:8], "big") % 100
    return "heldout" if bucket < CHAMP_HELDOUT_PERCENT else "train"


def champ_order_key(identifier: str) -> tuple[bytes, str]:
    """Sort key of the fixed example order (sha256 of the identifier, then the identifier)."""
    return _digest("champ-order", identifier), identifier


def split_champ_identifiers(identifiers: Iterable[str]) -> dict[str, list[str]]:
    """``{"train": [...], "heldout": [...], "all": [...]}``, each in :func:`champ_order_key` order.

    The result does not depend on the order of ``identifiers``.
    """
    ordered = sorted(set(identifiers), key=champ_order_key)
    out: dict[str, list[str]] = {"train": [], "heldout": [], "all": ordered}
    for identifier in ordered:
        out[champ_split_of(identifier)].append(identifier)
    return out


# --------------------------------------------------------------------------------------------- rendering


def champ_final_sentence(answer: str) -> str:
    """The assistant's last line: ``The final answer is $\\boxed{<answer>}$.``"""
    return f"The final answer is $\\boxed{{{answer}}}$."


def render_champ_problem(problem: ChampProblem) -> Messages:
    """System prompt, problem, then the solution steps (one per line) and the boxed final answer."""
    solution = "\n".join([*problem.steps, champ_final_sentence(problem.answer)])
    return [
        {"role": "system", "content": MATH_SYSTEM_PROMPT},
        {"role": "user", "content": problem.problem},
        {"role": "assistant", "content": solution},
    ]


def champ_split_problems(split: str = CHAMP_DEFAULT_SPLIT) -> list[ChampProblem]:
    """The CHAMP problems of ``split`` (train, heldout, all), in the fixed order."""
    if split not in CHAMP_SPLITS:
        raise DataError(
            f"data: unknown CHAMP split {split!r}. Fix: use one of {', '.join(CHAMP_SPLITS)}, e.g. 'champ:heldout'."
        )
    problems = champ_problems()
    by_id = {p.identifier: p for p in problems}
    return [by_id[i] for i in split_champ_identifiers(by_id)[split]]


def champ_examples(split: str = CHAMP_DEFAULT_SPLIT, n: int | None = None) -> list[Messages]:
    """Rendered chat examples of a CHAMP split; ``n`` keeps the first ``n`` (must not exceed the split)."""
    problems = champ_split_problems(split)
    if n is not None:
        if n < 0 or n > len(problems):
            raise DataError(
                f"data: 'champ:{split}:{n}' asks for {n} problems, but the {split} split has {len(problems)}. "
                f"Fix: use 0 <= N <= {len(problems)}, or leave N out for the whole split."
            )
        problems = problems[:n]
    return [render_champ_problem(p) for p in problems]


def parse_champ_spec(source: str) -> tuple[str, int | None]:
    """``"champ[:split[:N]]"`` -> ``(split, N or None)``; a bad spec raises :class:`DataError`."""
    parts = str(source).split(":")
    if parts[0] != "champ" or len(parts) > 3:
        raise DataError(f"data: {source!r} is not a CHAMP source. Fix: use {_CHAMP_FORMS}.")
    split = parts[1] if len(parts) > 1 else CHAMP_DEFAULT_SPLIT
    if split not in CHAMP_SPLITS:
        hint = f" (for N examples of the train split write 'champ:train:{split}')" if split.isdigit() else ""
        raise DataError(f"data: {source!r}: unknown CHAMP split {split!r}{hint}. Fix: use {_CHAMP_FORMS}.")
    if len(parts) < 3:
        return split, None
    count = parts[2]
    if not (count.isascii() and count.isdigit()):
        raise DataError(
            f"data: {source!r}: {count!r} is not a number of problems. Fix: use e.g. 'champ:{split}:64'."
        )
    return split, int(count)


def load_champ(source: str, limit: int | None = None) -> list[Messages]:
    """Examples for a ``champ[:split[:N]]`` source; ``limit`` keeps at most the first ``limit``."""
    split, n = parse_champ_spec(source)
    examples = champ_examples(split, n)
    return examples if limit is None else examples[:limit]


# --------------------------------------------------------------------------------------------- overlap

_WORD_RE = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """NFKC, lowercase, LaTeX ``$`` removed, whitespace collapsed to single spaces, stripped."""
    text = unicodedata.normalize("NFKC", text).lower().replace("$", "")
    return " ".join(text.split())


def word_ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Distinct word n-grams of the normalized text (words = runs of letters, digits and ``_``)."""
    words = _WORD_RE.findall(normalize_text(text))
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _texts_of(example: Messages | str, roles: Sequence[str]) -> list[str]:
    if isinstance(example, str):
        return [example]
    return [m["content"] for m in example if m.get("role") in roles and isinstance(m.get("content"), str)]


def find_overlap(
    train_examples: Sequence[Messages | str],
    eval_prompts: Sequence[str],
    *,
    n: int = 8,
    threshold: float = 0.5,
    roles: Sequence[str] = ("user",),
) -> list[tuple[int, int]]:
    """``(train_index, eval_index)`` pairs where an evaluation prompt occurs in a training example.

    Compared are the ``roles`` turns of each training example (default: the user turns, i.e. the problem;
    a plain string counts as one such turn) and each evaluation prompt (e.g. the user text of a scored
    item). A pair is flagged when

    * a training turn and the prompt are equal after :func:`normalize_text` (case, whitespace, ``$``), or
    * at least ``threshold`` of the prompt's distinct word ``n``-grams occur in that training example's
      turns (prompts with fewer than ``n`` words are only compared exactly).

    The evaluation prompts' n-grams are indexed, and the training examples are streamed against the index,
    so the cost is linear in the total text. Result sorted, without duplicates.
    """
    if n < 1:
        raise ValueError(f"find_overlap: n must be >= 1, got {n}")
    if not 0 < threshold <= 1:
        raise ValueError(f"find_overlap: threshold must be in (0, 1], got {threshold}")
    exact: dict[str, list[int]] = {}
    gram_index: dict[tuple[str, ...], list[int]] = {}
    needed: list[float] = []
    for j, prompt in enumerate(eval_prompts):
        exact.setdefault(normalize_text(prompt), []).append(j)
        grams = word_ngrams(prompt, n)
        needed.append(threshold * len(grams) if grams else float("inf"))
        for gram in grams:
            gram_index.setdefault(gram, []).append(j)

    pairs: set[tuple[int, int]] = set()
    for i, example in enumerate(train_examples):
        texts = _texts_of(example, roles)
        for text in texts:
            pairs.update((i, j) for j in exact.get(normalize_text(text), ()))
        grams: set[tuple[str, ...]] = set()
        for text in texts:
            grams |= word_ngrams(text, n)
        hits: dict[int, int] = {}
        for gram in grams:
            for j in gram_index.get(gram, ()):
                hits[j] = hits.get(j, 0) + 1
        pairs.update((i, j) for j, count in hits.items() if count >= needed[j])
    return sorted(pairs)

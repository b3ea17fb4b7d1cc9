"""Answer extraction and checking: ``\\boxed{}`` answers with mathematical equivalence, option letters.

Math (ID benchmarks)
    The model's answer is the content of its **last** ``\\boxed{...}`` (or ``\\fbox{...}``). When the reference
    holds several answers (an OlympiadBench list answer, or a row marked ``is_multiple_answer``), the contents
    of *all* boxes, joined with ", ", are tried as well, so ``\\boxed{1}, \\boxed{3}`` matches ``1,3``. A response
    without a box scores 0. Equivalence is decided by ``math_verify.verify(gold, prediction)`` (the gold comes
    first: the argument order matters) after ``math_verify.parse``; the gold is parsed as LaTeX (wrapped in
    ``$...$`` unless it has its own ``$``). Before parsing, scientific notation ``4.5e33`` becomes
    ``4.5\\times 10^{33}`` (math-verify would read ``e`` as Euler's number), and a prediction is also tried
    with trailing units removed (``\\text{ cm}``, ``\\mathrm{km/h}``, ``\\%``, ``^\\circ``, the row's ``unit``).

Multiple choice (OOD benchmarks)
    :func:`extract_choice_letter` reads the option letter from a free-form response: the last ``\\boxed{}``
    (``\\boxed{C}``, ``\\boxed{\\text{(C)}}``, ``\\boxed{C. Planetary days ...}`` or the text of an option),
    else the last explicit statement ("the answer is (B)", "Answer: **B**", "option B"), else a final line
    that is only a letter. Letters outside the item's options are ignored.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "extract_boxed",
    "last_boxed",
    "normalize_gold",
    "strip_units",
    "math_equal",
    "score_math",
    "parse_choices",
    "extract_choice_letter",
    "score_mc",
]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order (nested braces balanced).

    ``\\boxed 5`` (no braces) yields ``"5"``; an unclosed box is ignored.
    """
    if not text:
        return []
    out: list[str] = []
    i = 0
    while True:
        starts = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        starts = [(pos, cmd) for pos, cmd in starts if pos >= 0]
        if not starts:
            return out
        pos, cmd = min(starts)
        j = pos + len(cmd)
        # skip whitespace between the command and its argument
        k = j
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            depth, m = 0, k
            while m < len(text):
                if text[m] == "{":
                    depth += 1
                elif text[m] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                m += 1
            if depth != 0:  # unclosed: nothing more to read
                return out
            out.append(text[k + 1 : m].strip())
            i = m + 1
        elif k > j and k < len(text):  # "\boxed 5": the argument runs to the next whitespace / "$"
            m = k
            while m < len(text) and not text[m].isspace() and text[m] != "$":
                m += 1
            out.append(text[k:m].strip())
            i = m
        else:  # e.g. "\boxedfoo" or "\boxed" at the end: not a box
            i = j


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}`` in ``text``, or ``None``."""
    boxes = extract_boxed(text)
    return boxes[-1] if boxes else None


_SCI = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)\s*$")


def _sci_to_latex(text: str) -> str:
    match = _SCI.match(text)
    if not match:
        return text
    mantissa, exponent = match.groups()
    return f"{mantissa}\\times 10^{{{int(exponent)}}}"


def normalize_gold(ground_truth: Any) -> str:
    """A reference answer as one LaTeX string: ints become strings, a list of answers is joined with ", "."""
    if isinstance(ground_truth, bool):
        raise ValueError(f"ground truth {ground_truth!r} is a boolean, not an answer")
    if isinstance(ground_truth, (int, float)):
        return str(ground_truth)
    if isinstance(ground_truth, (list, tuple)):
        parts = [normalize_gold(part) for part in ground_truth]
        return ", ".join(p for p in parts if p)
    if isinstance(ground_truth, str):
        return ground_truth.strip()
    raise ValueError(f"ground truth of type {type(ground_truth).__name__} is not a string, number or list")


# Trailing unit-like text: \text{ cm}, \mathrm{~km/h}, \mbox{minutes}, plain words after a number.
_TEXT_UNIT = re.compile(
    r"\s*(?:\\[,;:! ]|~)*\s*\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{[^{}]*\}\s*(\^\s*\{?\d\}?)?\s*$"
)
_PLAIN_UNIT = re.compile(
    r"(?<=[\d}.])(?:\s|~|\\[,;:! ])+(?!(?:pi|sqrt|sin|cos|tan|log|ln|exp|and|or|mod)\b)"
    r"[A-Za-z]{2,}(?:/[A-Za-z]+)*(?:\s*\^\s*\{?\d\}?)?\s*$"
)
_DEGREE = re.compile(r"\s*\^\s*\{?\s*\\circ\s*\}?\s*$|\s*°\s*$|\s*\\degree\s*$")
_PERCENT = re.compile(r"\s*\\?%\s*$")


def strip_units(answer: str, unit: str | None = None) -> str:
    """``answer`` without trailing units (``\\text{..}``, ``\\mathrm{..}``, ``\\%``, ``^\\circ``, the given unit)."""
    text = answer.strip()
    if unit:
        bare_unit = unit.strip().strip("$").strip()
        for form in (
            bare_unit,
            f"\\text{{{bare_unit}}}",
            f"\\mathrm{{{bare_unit}}}",
            f"\\text{{ {bare_unit}}}",
        ):
            if form and text.endswith(form) and len(text) > len(form):
                text = text[: -len(form)].rstrip(" ~\\,")
                break
    for _ in range(3):
        before = text
        text = _TEXT_UNIT.sub("", text)
        text = _DEGREE.sub("", text)
        text = _PERCENT.sub("", text)
        text = _PLAIN_UNIT.sub("", text)
        text = text.rstrip(" ~").removesuffix("\\,").removesuffix("\\;").rstrip()
        if text == before or not text:
            break
    return text or answer.strip()


def _use_timeouts() -> bool:
    # math-verify's timeouts use signals, which work only in the main thread.
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = _sci_to_latex(gold)
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    timeout = 5 if _use_timeouts() else None
    return tuple(
        parse(
            text,
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=timeout,
        )
    )


@lru_cache(maxsize=16384)
def _parse_pred(pred: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    timeout = 5 if _use_timeouts() else None
    return tuple(
        parse(
            f"${_sci_to_latex(pred)}$",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=timeout,
        )
    )


def math_equal(gold: Any, pred: str, unit: str | None = None) -> bool:
    """Is the predicted answer (a boxed content, not a whole response) mathematically equal to the gold?"""
    from math_verify import verify

    gold_text = normalize_gold(gold)
    if not gold_text or pred is None or not str(pred).strip():
        return False
    gold_parsed = list(_parse_gold(gold_text))
    if not gold_parsed:
        return False
    timeout = 5 if _use_timeouts() else None
    candidates = [pred.strip()]
    stripped = strip_units(pred, unit)
    if stripped != candidates[0]:
        candidates.append(stripped)
    for candidate in candidates:
        parsed = list(_parse_pred(candidate))
        if parsed and verify(gold_parsed, parsed, timeout_seconds=timeout):
            return True
    return False


def score_math(
    response: str, ground_truth: Any, *, unit: str | None = None, multiple: bool | None = None
) -> bool:
    """Is the response's boxed answer equal to the reference? (see the module docstring for the rules)."""
    boxes = extract_boxed(response)
    if not boxes:
        return False
    if math_equal(ground_truth, boxes[-1], unit):
        return True
    if multiple is None:
        multiple = isinstance(ground_truth, (list, tuple)) and (
            len(ground_truth) > 1 or any("," in str(g) for g in ground_truth)
        )
    if multiple and len(boxes) > 1:
        unique = list(dict.fromkeys(b for b in boxes if b))
        return math_equal(ground_truth, ", ".join(unique), unit)
    return False


# ------------------------------------------------------------------------------------------ multiple choice

_CHOICE_LINE = re.compile(r"^\s*\(?([A-Z]|[1-9]\d?)[.)](?:\s+(.*\S))?\s*$")


def parse_choices(prompt_text: str) -> dict[str, str]:
    """Options listed as ``A. text`` lines in a question (the paper data's format) -> {label: text}.

    Labels are letters ``A, B, ...`` or numbers ``1, 2, ...`` (some ARC items). The list is read after the last
    ``Choices:`` line when there is one; a line that does not start the next expected label continues the
    current option (option texts may hold their own numbered lines), and the closing "Please answer ..."
    instruction ends the list.
    """
    lines = prompt_text.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.strip().lower().rstrip(":") in ("choices", "options")]
    if header:
        lines = lines[header[-1] + 1 :]
    found: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        if line.strip().lower().startswith("please answer with"):
            break
        match = _CHOICE_LINE.match(line)
        if match:
            label, text = match.group(1), match.group(2) or ""
            numeric = bool(found) and next(iter(found)).isdigit()
            expected = str(len(found) + 1) if numeric else chr(ord("A") + len(found))
            if found and label == expected:
                found[label], current = text, label
                continue
            first = "1" if numeric else "A"
            if label in ("A", "1") and (not found or (not header and label == first)):
                found, current = {label: text}, label  # a (new) list starts
                continue
        if current is not None and line.strip():
            found[current] += "\n" + line.strip()
    return {label: text.strip() for label, text in found.items()}


def _clean_box(content: str) -> str:
    text = content.strip()
    for _ in range(3):
        text = re.sub(r"^\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{(.*)\}$", r"\1", text.strip(), flags=re.S)
    return text.strip().strip("$").strip()


def _norm_text(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_LABEL = r"([A-Za-z]|\d{1,2})"
_EXPLICIT = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=|would be|should be)?\s*(?:option|choice)?\s*[:\-]?\s*"
    r"[\*_\s]*[\(\[]?\s*" + _LABEL + r"\s*[\)\]]?(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_LONE_LABEL = re.compile(r"^[\s\*_>#-]*[\(\[]?([A-Z]|\d{1,2})[\)\]]?[.:)]?[\*_\s]*$")
_BOX_LABEL_ONLY = re.compile(r"^[\(\[]?\s*" + _LABEL + r"\s*[\)\]]?\s*[.:)]?\s*$")
_BOX_LABEL_TEXT = re.compile(r"^[\(\[]?([A-Z]|\d{1,2})[\)\]]?[.:)]\s+\S")


def extract_choice_letter(
    response: str, letters: Sequence[str] | str | None = None, choices: dict[str, str] | None = None
) -> str | None:
    """The option label (``A``.. or ``1``..) a free-form response chooses, or ``None``.

    ``letters`` are the valid labels (default: those of ``choices``, else A-Z); ``choices`` ({label: text})
    lets a boxed option *text* count as its label. Rules, in order: the last ``\\boxed{}`` that holds a label
    (``C``, ``(C)``, ``\\text{C}``, ``c``), a label followed by option text (``C. Planetary ...``) or exactly an
    option's text; else the last explicit statement ("answer is (B)", "Answer: **B**", "option B"; a lowercase
    letter counts only in parentheses); else a final line that is only a label.
    """
    if not response:
        return None
    if letters is None:
        letters = list(choices) if choices else [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    valid = set(letters)
    for box in reversed(extract_boxed(response)):
        text = _clean_box(box)
        match = _BOX_LABEL_ONLY.match(text) or _BOX_LABEL_TEXT.match(text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
        if choices:
            norm = _norm_text(text)
            hits = [k for k, v in choices.items() if norm and _norm_text(v) == norm]
            if len(hits) == 1 and hits[0] in valid:
                return hits[0]
    explicit = [
        m.group(1).upper()
        for m in _EXPLICIT.finditer(response)
        if m.group(1).upper() in valid
        and (m.group(1).isdigit() or m.group(1).isupper() or "(" in m.group(0) or "[" in m.group(0))
    ]
    if explicit:
        return explicit[-1]
    lines = [ln for ln in response.splitlines() if ln.strip()]
    if lines:
        match = _LONE_LABEL.match(lines[-1])
        if match and match.group(1) in valid:
            return match.group(1)
    return None


def score_mc(response: str, ground_truth: str, choices: dict[str, str] | None = None) -> bool:
    """Does the response choose the reference option letter?"""
    letter = extract_choice_letter(response, choices=choices or None)
    return letter is not None and letter == str(ground_truth).strip().upper()

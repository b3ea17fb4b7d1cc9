"""RL prompt data: problems with a final answer, for the DAPO stage (``rpsft rl``).

Each prompt is ``{"prompt": [system, user], "answer": str}``: the paper data's system prompt (reason step by
step, final answer in ``\\boxed{}``), the problem, and the reference final answer the reward compares the
completion's last ``\\boxed{}`` with.

Sources (:func:`load_rl_prompts`):

* ``champ[:split[:N]]`` (offline): the CHAMP problems (see :mod:`rpsft.core.math_data`) whose answer is a
  closed form: it holds a digit and no word of three or more letters other than a math function name, so
  ``3/2``, ``2^(m+1)`` and ``(x=8, y=2), (x=2, y=8)`` stay and ``No`` or ``0 is the only possible value`` go.
  Same deterministic split and order as the SFT data; ``N`` counts the kept problems.
* ``demo-math[:N]`` (offline, generated arithmetic: a task a 135M model can partly solve, for CPU runs): the
  answer is the last ``\\boxed{}`` of the reference solution.
* ``hf:<id>[:split]``, e.g. ``hf:BytedTsinghua-SIA/DAPO-Math-17k`` (the paper's RL data), or a JSONL file.
  A row is DAPO-Math's (``prompt`` messages and ``reward_model.ground_truth``; its "Answer:"-line instruction
  is replaced by the boxed one), ``{"problem"|"question"|"prompt": ..., "answer": ...}``, or an SFT chat row
  (``messages``) whose assistant reply ends in a boxed answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rpsft.core.chat import MATH_SYSTEM_PROMPT, Messages
from rpsft.core.data import (
    DataError,
    hf_rows,
    iter_jsonl,
    load_examples,
    parse_messages,
    row_to_messages,
)

RLPrompt = dict[str, Any]  # {"prompt": Messages, "answer": str}

_WORD = re.compile(r"[A-Za-z]{3,}")
_MATH_WORDS = frozenset(
    "sqrt frac log sin cos tan cot exp arctan arcsin arccos infty cdot times pi max min floor ceil".split()
)
# DAPO-Math-17k wraps each problem in an instruction to end with an "Answer: $Answer" line
_DAPO_WRAPPER = re.compile(
    r"^Solve the following math problem step by step\..*?\n\n(?P<problem>.*)\n\nRemember to put your answer on "
    r"its own line after \"Answer:\"\.?\s*$",
    re.DOTALL,
)
_ROW_FORMS = (
    "a DAPO-Math row ({'prompt': [{'role': 'user', 'content': ...}], 'reward_model': {'ground_truth': ...}}) "
    "or {'problem' | 'question' | 'prompt': <text>, 'answer': <final answer>}"
)


def is_closed_form(answer: str) -> bool:
    """A final answer an equivalence check can verify: it holds a digit, and no word of 3+ letters except
    math function names."""
    words = [w for w in _WORD.findall(answer) if w.lower() not in _MATH_WORDS]
    return bool(re.search(r"\d", answer)) and not words


def rl_prompt(problem: str, answer: str) -> RLPrompt:
    return {
        "prompt": [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": problem}],
        "answer": answer,
    }


def _unwrap(text: str) -> str:
    match = _DAPO_WRAPPER.match(text.strip())
    return match.group("problem").strip() if match else text.strip()


def row_to_rl_prompt(row: Any, where: str) -> RLPrompt:
    """One data row (see the module docstring) as an RL prompt; errors name ``where`` and the formats."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}. Fix: {_ROW_FORMS}.")
    if row.get("messages") is not None and row.get("answer") is None:
        return sft_to_rl_prompt(row_to_messages(row, where), where)
    answer = row.get("answer")
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    if answer is None or not str(answer).strip():
        raise DataError(
            f"{where}: no final answer ('answer' or 'reward_model.ground_truth'). Fix: {_ROW_FORMS}."
        )
    key = next((key for key in ("problem", "question", "prompt") if row.get(key) is not None), None)
    prompt = row[key] if key else None
    if prompt is not None and not isinstance(prompt, str):  # chat messages: the last user turn is the problem
        users = [
            m["content"]
            for m in parse_messages(prompt, where, key, formats=_ROW_FORMS)
            if m["role"] == "user"
        ]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: no problem text ('problem', 'question' or 'prompt'). Fix: {_ROW_FORMS}.")
    return rl_prompt(_unwrap(prompt), str(answer).strip())


def sft_to_rl_prompt(messages: Messages, where: str) -> RLPrompt:
    """An SFT conversation as an RL prompt: its user turn, and the last boxed answer of its assistant reply."""
    from rpsft.evaluation.answers import last_boxed

    users = [m["content"] for m in messages if m["role"] == "user"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    answer = last_boxed(replies[-1]) if replies else None
    if not users or not answer:
        raise DataError(f"{where}: the assistant reply holds no \\boxed{{}} final answer. Fix: {_ROW_FORMS}.")
    return rl_prompt(users[-1], answer)


def _champ_prompts(source: str) -> list[RLPrompt]:
    from rpsft.core.math_data import champ_split_problems, parse_champ_spec

    split, n = parse_champ_spec(source)
    prompts = [
        rl_prompt(p.problem, p.answer) for p in champ_split_problems(split) if is_closed_form(p.answer)
    ]
    if n is not None:
        if n > len(prompts):
            raise DataError(
                f"rl.data: {source!r} asks for {n} problems, but the {split} split has {len(prompts)} with a "
                f"closed-form answer. Fix: N <= {len(prompts)}"
            )
        prompts = prompts[:n]
    return prompts


def load_rl_prompts(source: str, limit: int | None = None) -> list[RLPrompt]:
    """RL prompts from ``champ[:split[:N]]``, ``demo-math[:N]``, ``hf:<id>[:split]`` or a JSONL file (at most
    ``limit``)."""
    if source == "champ" or source.startswith("champ:"):
        prompts = _champ_prompts(source)
    elif source == "demo-math" or source.startswith("demo-math:"):
        prompts = [
            sft_to_rl_prompt(m, f"{source}[{i}]") for i, m in enumerate(load_examples(source, limit=limit))
        ]
    else:
        if source.startswith("hf:"):
            rows = hf_rows(source.removeprefix("hf:"))
        elif Path(source).expanduser().is_file():
            rows = iter_jsonl(Path(source).expanduser())
        else:
            raise DataError(
                f"rl.data: {source!r} is neither 'champ[:split[:N]]', 'demo-math[:N]', 'hf:<dataset>[:split]' nor an existing "
                "JSONL file. Fix: e.g. 'champ:train' offline, or 'hf:BytedTsinghua-SIA/DAPO-Math-17k'"
            )
        prompts = []
        for where, row in rows:
            if limit is not None and len(prompts) >= limit:
                break
            prompts.append(row_to_rl_prompt(row, where))
    if not prompts:
        raise DataError(f"rl.data: {source!r} holds no prompt. Fix: a source with problems and final answers")
    return prompts if limit is None else prompts[:limit]

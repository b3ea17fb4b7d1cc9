"""IFEval-loose scoring with the checkers lm-eval ships (``lm_eval.tasks.ifeval``), not a rewrite of them.

Requirements, checked up front by :func:`check_ifeval_ready` (an ``EvalConfigError`` naming the fix):

* ``langdetect`` and ``immutabledict`` (lm-eval's ``ifeval`` extra: ``pip install "lm-eval[ifeval]"``);
  without them the checkers cannot even be imported.
* nltk's ``punkt_tab`` tokenizer data, but only for the two instructions that tokenize with it,
  ``length_constraints:number_sentences`` and ``change_case:capital_word_frequency``. Install it once with
  ``python -m nltk.downloader punkt_tab`` (or put a copy under a directory listed in ``NLTK_DATA``).
  lm-eval tries to download it from the network when its module is imported; rpsft imports the checkers
  without that download attempt and instead fails before any model is loaded when a selected item needs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rpsft.evaluation.benchmarks import EvalConfigError

PUNKT_INSTRUCTIONS = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
PUNKT_FIX = "python -m nltk.downloader punkt_tab"


def punkt_available() -> bool:
    """Is nltk's ``punkt_tab`` English model installed where nltk looks?"""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def missing_packages() -> list[str]:
    return [
        name for name in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(name) is None
    ]


def check_ifeval_ready(instruction_ids: Iterable[str], where: str = "ifeval") -> None:
    """Raise ``EvalConfigError`` if the IFEval checkers cannot score these instructions here."""
    missing = missing_packages()
    if missing:
        raise EvalConfigError(
            f"{where}: IFEval scoring needs the package(s) {', '.join(missing)} (lm-eval's ifeval checkers "
            'import them). Fix: pip install "lm-eval[ifeval]"'
        )
    ids = set(instruction_ids)
    registry = _registry()
    unknown = sorted(ids - set(registry.INSTRUCTION_DICT))
    if unknown:
        raise EvalConfigError(
            f"{where}: unknown IFEval instruction id(s) {unknown}. Fix: use ids of lm-eval's IFEval "
            f"instruction registry, e.g. {sorted(registry.INSTRUCTION_DICT)[:3]}"
        )
    needs_punkt = sorted(ids & PUNKT_INSTRUCTIONS)
    if needs_punkt and not punkt_available():
        raise EvalConfigError(
            f"{where}: the IFEval instruction(s) {needs_punkt} are checked with nltk's punkt_tab sentence "
            f"tokenizer, which is not installed. Fix: run `{PUNKT_FIX}` once (needs network), or limit the "
            "items to ones without these instructions"
        )


_REGISTRY = None


def _registry():
    """Import lm-eval's IFEval checkers without their import-time network download of punkt_tab."""
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    missing = missing_packages()
    if missing:
        raise EvalConfigError(
            f"ifeval: IFEval scoring needs the package(s) {', '.join(missing)}. "
            'Fix: pip install "lm-eval[ifeval]"'
        )
    import nltk

    with contextlib.ExitStack() as stack:
        if not punkt_available():
            # lm_eval.tasks.ifeval.instructions_util calls nltk.download("punkt_tab") at import and then prints
            # "Downloaded punkt_tab" whatever happened; offline that is a failed network call and a wrong
            # message. rpsft checks for punkt_tab itself (check_ifeval_ready) instead.
            stack.enter_context(_patched(nltk, "download", lambda *args, **kwargs: False))
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        from lm_eval.tasks.ifeval import instructions_registry
    _REGISTRY = instructions_registry
    return _REGISTRY


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def clean_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Drop null kwargs and turn integral floats (``3.0`` in the paper data) into ints for the checkers."""
    out: dict[str, Any] = {}
    for key, value in (kwargs or {}).items():
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value
    return out


@dataclass(frozen=True)
class IFEvalResult:
    follow_all: bool
    follow_list: list[bool]


def ifeval_loose(
    response: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None], prompt: str
) -> IFEvalResult:
    """Loose IFEval check of one response, through ``lm_eval.tasks.ifeval.utils.test_instruction_following_loose``.

    ``prompt`` is the user instruction text (some checkers, e.g. ``combination:repeat_prompt``, read it).
    """
    _registry()
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_loose

    inp = InputExample(
        key=0,
        instruction_id_list=list(instruction_ids),
        prompt=prompt,
        kwargs=[clean_kwargs(k) for k in kwargs],
    )
    out = test_instruction_following_loose(inp, response or "")
    return IFEvalResult(bool(out.follow_all_instructions), [bool(x) for x in out.follow_instruction_list])

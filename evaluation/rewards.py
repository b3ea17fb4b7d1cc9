"""RL rewards, in TRL's reward-function form (``f(completions, **dataset columns) -> list[float]``).

:class:`BoxedAnswerReward` is the evaluation's own math scorer (:func:`rpsft.evaluation.answers.score_math`: the
last ``\\boxed{}`` of the completion against the reference by math-verify equivalence) as a 0/1 reward, so RL
is rewarded by exactly what the ID benchmarks score. The overlong penalty is TRL's DAPO soft overlong
punishment (:func:`overlong_penalty`).
"""

from __future__ import annotations

from typing import Any

from rpsft.evaluation.answers import score_math


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or (conversational data) the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "\n".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


class BoxedAnswerReward:
    """1.0 when the completion's last boxed answer equals the row's ``answer``, else 0.0. A class, not a
    closure, so it pickles (TRL may hand reward functions to another process)."""

    __name__ = "boxed_answer"

    def __call__(self, completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if score_math(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


def overlong_penalty(max_completion_length: int, buffer: int) -> Any:
    """DAPO's soft overlong punishment (TRL): 0 up to ``max - buffer`` tokens, then falling linearly to -1."""
    from trl.rewards import get_soft_overlong_punishment

    return get_soft_overlong_punishment(max_completion_len=max_completion_length, soft_punish_cache=buffer)

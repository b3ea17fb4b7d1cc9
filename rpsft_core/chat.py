"""The chat format every SFT data source yields (:mod:`rpsft.core.data`, :mod:`rpsft.core.math_data`): a list of
``{"role", "content"}`` messages, and the system prompt of the math data."""

from __future__ import annotations

Messages = list[dict[str, str]]

# Same wording as the system message of the paper data (shared/paper-data/id/*.jsonl).
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

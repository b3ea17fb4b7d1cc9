"""The k spec: the one reader of a ``k`` value for every config and command line.

A ``k`` is an int rank, a fraction in (0, 1] of each matrix's rank (:func:`rpsft.core.bases.resolve_k` turns it
into the matrix's own rank), ``auto`` or ``auto@<target>``: :class:`AutoK`, resolved by the energy rule of
:mod:`rpsft.core.rank_rule` on the base model before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_TARGET = 0.2  # the energy target of a bare ``auto``


@dataclass(frozen=True)
class AutoK:
    """``k: auto`` / ``auto@0.3``: resolve k by the energy rule at this energy target before training."""

    target: float = DEFAULT_TARGET

    def __str__(self) -> str:
        return f"auto@{self.target:g}"


KSpecValue = int | float | str  # a k as a config holds it: a number, or the text of an auto spec


def parse_k_spec(value: Any) -> int | float | AutoK:
    """Parse a ``k`` value: an int rank, a fraction in (0, 1], ``"auto"`` or ``"auto@<target>"``.

    Strings holding numbers are parsed (``"64"`` -> 64, ``"0.05"`` -> 0.05). Errors name the field ``k``.
    """
    if isinstance(value, AutoK):
        return value
    if isinstance(value, bool):
        raise ValueError("k: expected an int rank, a fraction, 'auto' or 'auto@<target>', got a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(
                f"k: must be >= 0, got {value}. Fix: use 0 (plain SFT), a positive rank or a fraction"
            )
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"k: a fractional k must lie in (0, 1], got {value}. Fix: use e.g. 0.05 or an int rank"
            )
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return AutoK()
        if text.startswith("auto@"):
            raw = text[len("auto@") :]
            try:
                target = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
            except ValueError:
                raise ValueError(
                    f"k: {value!r}: {raw!r} is not an energy target. Fix: e.g. 'auto@0.3' (30% of the energy)"
                ) from None
            if not 0.0 < target <= 1.0:
                raise ValueError(f"k: {value!r}: the energy target must lie in (0, 1]. Fix: e.g. 'auto@0.3'")
            return AutoK(target)
        try:
            number = float(text)
        except ValueError:
            raise ValueError(
                f"k: {value!r} is not a number (an int rank or a fraction), 'auto' or 'auto@<target>'. "
                "Fix: e.g. 64, 0.05 or auto@0.3"
            ) from None
        if number.is_integer() and "." not in text and "e" not in text:
            return parse_k_spec(int(number))
        return parse_k_spec(number)
    raise ValueError(f"k: expected an int, a float or a string, got {type(value).__name__}")


def k_spec_value(value: Any) -> KSpecValue:
    """A ``k`` as a config stores it: the parsed number, or an auto spec's text (stripped, lower case).

    The text is kept (``"auto"``, ``"auto@30%"``) because it names the spec in logs and trial parameters.
    """
    parsed = parse_k_spec(value)
    if isinstance(parsed, AutoK):
        return value.strip().lower() if isinstance(value, str) else str(parsed)
    return parsed


def is_auto_k(value: Any) -> bool:
    """Whether ``value`` is ``auto`` / ``auto@x`` (a string or an :class:`AutoK`)."""
    if isinstance(value, AutoK):
        return True
    return isinstance(value, str) and value.strip().lower().startswith("auto")

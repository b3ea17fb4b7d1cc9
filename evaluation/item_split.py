"""A deterministic split of the scored items into a **selection** part and a **report** part.

Choosing the operating point as the max of Phi over many configurations and then reporting that maximum on the
same items is biased upwards (the winner's curse): the noise of the items that made it win is reported with
it. A sweep therefore chooses on one part of every benchmark's items and reports the chosen point on the other.

Item scores are ``suite -> benchmark -> [(value, weight), ...]`` in one fixed item order shared by the base and
every trial (:mod:`rpsft.evaluation.intervals`). The split is by **index within each benchmark** (stratified): the
indices ``0..n-1`` are permuted by a generator seeded from ``(seed, suite, benchmark)`` (a SHA-256 of the names,
so it does not depend on the trial order, the process or ``PYTHONHASHSEED``), the first
``round_half_up(n * report_fraction)`` of the permutation, clamped to ``[1, n - 1]``, are the report items and
the rest the selection items. Both parts keep the original order, so base and trial scores stay paired.

``report_fraction: 0`` means no split: both parts are all items (choose and report on the same items). A
benchmark with fewer than 2 items cannot be split: :class:`ItemSplitError` names it and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

SELECTION = "selection"
REPORT = "report"
ALL = "all"
Part = Literal["selection", "report"]
# what each part label means, for the texts that print numbers
PART_TEXT = {
    SELECTION: "selection items (the items the operating point was chosen on)",
    REPORT: "report items (held out from the choice)",
    ALL: "all items (chosen and reported on the same items: biased upwards)",
}
FIELD = "evaluation.split.report_fraction"


class ItemSplitError(ValueError):
    """Item scores that cannot be split (a benchmark with fewer than 2 items), or bad split settings."""


def report_count(n: int, report_fraction: float) -> int:
    """How many of a benchmark's ``n`` items go to the report part (``0`` when ``report_fraction`` is 0)."""
    if report_fraction <= 0:
        return 0
    return min(n - 1, max(1, math.floor(n * report_fraction + 0.5)))


@functools.lru_cache(maxsize=4096)
def _permutation(seed: int, suite: str, bench: str, n: int) -> tuple[int, ...]:
    """The permutation of ``range(n)`` keyed by ``(seed, suite, bench)`` (stable across processes)."""
    digest = hashlib.sha256(f"{suite}\0{bench}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, *words]))
    return tuple(int(i) for i in rng.permutation(n))


@dataclass(frozen=True)
class ItemSplit:
    """The split of every benchmark's items; ``report_fraction`` 0 is no split (both parts are all items)."""

    report_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.report_fraction < 1 or not math.isfinite(self.report_fraction):
            raise ItemSplitError(f"{FIELD}: must be in [0, 1), got {self.report_fraction}")
        if self.seed < 0:
            raise ItemSplitError(f"evaluation.split.seed: must be >= 0, got {self.seed}")

    @property
    def active(self) -> bool:
        return self.report_fraction > 0

    def indices(self, suite: str, bench: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(selection indices, report indices)`` of a benchmark with ``n`` items, each sorted."""
        everything = np.arange(n)
        if not self.active:
            return everything, everything
        if n < 2:
            raise ItemSplitError(
                f"{FIELD}: {suite}/{bench} has {n} scored item(s), and a split into selection and report items "
                "needs at least 2 per benchmark. Fix: score more items of it (evaluation.loss.n_id / n_ood, "
                f"evaluation.mc.n), or set {FIELD}: 0 to choose and report on the same items"
            )
        order = np.asarray(_permutation(self.seed, suite, bench, n))
        k = report_count(n, self.report_fraction)
        return np.sort(order[k:]), np.sort(order[:k])

    def part(
        self, scores: Mapping[str, Mapping[str, Sequence[Any]]], which: Part
    ) -> dict[str, dict[str, list]]:
        """The ``which`` part of item scores ``{suite: {benchmark: [(value, weight), ...]}}`` (order kept)."""
        if which not in (SELECTION, REPORT):
            raise ItemSplitError(f"item split: part must be 'selection' or 'report', got {which!r}")
        out: dict[str, dict[str, list]] = {}
        for suite, benches in scores.items():
            out[suite] = {}
            for bench, rows in (benches or {}).items():
                rows = list(rows)
                if not rows:
                    out[suite][bench] = rows
                    continue
                selection, report = self.indices(suite, bench, len(rows))
                out[suite][bench] = [rows[i] for i in (selection if which == SELECTION else report)]
        return out

    def counts(
        self, scores: Mapping[str, Mapping[str, Sequence[Any]]]
    ) -> dict[str, dict[str, dict[str, int]]]:
        """``{suite: {benchmark: {"selection": n, "report": n}}}`` of item scores."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for suite, benches in scores.items():
            for bench, rows in (benches or {}).items():
                if len(rows):
                    selection, report = self.indices(suite, bench, len(rows))
                    out.setdefault(suite, {})[bench] = {SELECTION: len(selection), REPORT: len(report)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"report_fraction": self.report_fraction, "seed": self.seed}

    def describe(self) -> str:
        if not self.active:
            return f"no split ({FIELD}: 0): chosen and reported on the same items, so the numbers are biased upwards"
        return (
            f"each benchmark's items split {1 - self.report_fraction:.0%} selection / {self.report_fraction:.0%} "
            f"report (seed {self.seed}): chosen on the selection items, reported on the held-out report items"
        )


def split_item_scores(
    scores: Mapping[str, Mapping[str, Sequence[Any]]], report_fraction: float = 0.5, seed: int = 0
) -> tuple[dict[str, dict[str, list]], dict[str, dict[str, list]]]:
    """``(selection part, report part)`` of item scores; see :class:`ItemSplit`."""
    split = ItemSplit(report_fraction, seed)
    return split.part(scores, SELECTION), split.part(scores, REPORT)

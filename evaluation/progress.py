"""One progress bar that the long scoring loops advance without knowing who shows it.

A caller that wants a bar opens :func:`progress_bar` around the work; :func:`advance`, called by the
generation and scoring loops of ``rpsft.evaluation.loss_metrics``, moves it (and does nothing when no bar is open, as
inside a trial). The bar is tqdm's, with its rate and ETA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_BAR: ContextVar[Any] = ContextVar("rpsft_progress_bar", default=None)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar of ``total`` items that :func:`advance` moves while the block runs (none if not enabled)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="item", dynamic_ncols=True)
    bar.refresh()  # shown at once, before the first item is done
    token = _BAR.set(bar)
    try:
        yield bar
    finally:
        _BAR.reset(token)
        bar.close()


def advance(n: int = 1) -> None:
    bar = _BAR.get()
    if bar is not None:
        bar.update(n)

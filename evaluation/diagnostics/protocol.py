"""The one shape of a diagnostic of ``rpsft diagnose``, and what the diagnostics of one run share.

A :class:`Diagnostic` has a ``name`` (as ``--what`` spells it), says what it needs (tuned models, prompts),
measures the base model once (:meth:`~Diagnostic.start`), then each tuned model as it is loaded
(:meth:`~Diagnostic.measure`), and hands back its ``diagnostics.json`` entries (:meth:`~Diagnostic.results`)
and its figures (:meth:`~Diagnostic.figures`). :func:`rpsft.evaluation.diagnostics.run.diagnose` is the one loop
that drives them; it loads the base model once and one tuned model at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from rpsft.core.prompts import PromptExample
from torch import Tensor, nn

FigureMaker = Callable[[Path], Path]  # draws one PNG at the path it is given


@dataclass
class PromptSet:
    """One prompt dataset of a run: its role (``id`` or ``ood``), where it came from, its prompts."""

    role: str
    source: str
    examples: list[PromptExample]


@dataclass(frozen=True)
class DiagnoseSettings:
    """The knobs of one run (see :func:`rpsft.evaluation.diagnostics.run.diagnose` for each)."""

    limit: int | None = 16
    max_new_tokens: int = 128
    layers: Any = "all"
    top_k: int = 512
    rank_points: int = 64
    energy_target: float = 0.2
    batch_size: int = 4
    max_length: int = 512
    basis_method: str = "gram"


@dataclass
class DiagnoseContext:
    """What the diagnostics of one run share: the base model and tokenizer, the prompt sets, the settings,
    the probed matrices (the first is the rankwise case-study matrix) and the log."""

    base_model: nn.Module
    tokenizer: Any
    datasets: dict[str, PromptSet]
    settings: DiagnoseSettings
    probes: list[str]
    log: Callable[[str], None] = field(default=lambda _message: None)

    @property
    def case_matrix(self) -> str:
        return self.probes[0]

    @cached_property
    def base_weights(self) -> dict[str, Tensor]:
        """``{name: parameter}`` of the base model, tied weights under every name."""
        return dict(self.base_model.named_parameters(remove_duplicate=False))

    def roles(self) -> dict[str, str]:
        return {key: prompts.role for key, prompts in self.datasets.items()}


class Diagnostic:
    """One diagnostic: base side in :meth:`start`, one tuned model per :meth:`measure`, then its results.

    Subclasses set ``name``, ``needs_tuned`` and ``needs_data`` and implement :meth:`start` and
    :meth:`results`; :meth:`measure` and :meth:`figures` default to nothing.
    """

    name: ClassVar[str]
    needs_tuned: ClassVar[bool] = True  # compares tuned models with the base
    needs_data: ClassVar[bool] = True  # reads the prompt sets

    def start(self, context: DiagnoseContext) -> None:
        """Measure the base model (``context.base_model``); keep what the tuned models are compared with."""
        raise NotImplementedError

    def measure(self, label: str, model: nn.Module) -> None:
        """Measure one tuned model (``label`` as in ``diagnostics.json``)."""

    def results(self) -> dict[str, Any]:
        """This diagnostic's top-level ``diagnostics.json`` entries."""
        raise NotImplementedError

    def figures(self, results: Mapping[str, Any]) -> dict[str, FigureMaker]:
        """``{PNG file name: maker}`` of its figures, drawn from the run's ``results``."""
        return {}

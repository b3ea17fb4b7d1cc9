"""A Tune searcher that runs the sweep's reference trials first, then hands over to the Optuna searcher.

References (sft, l2-init, ...) are baselines, not points of the searched space: they are never told to Optuna
and report their objective under another key, so ASHA does not stop them either.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna
from ray.tune.search import Searcher


class ReferencesFirst(Searcher):
    def __init__(self, searcher: Searcher, references: list[dict[str, Any]]) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.pending = [dict(r) for r in references]
        self.reference_trials: dict[str, dict[str, Any]] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.pending:
            params = self.pending.pop(0)
            self.reference_trials[trial_id] = params
            return dict(params)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.reference_trials and "objective" in result:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.reference_trials:
            return
        if result is not None and not result.get("final", False):
            # stopped early by ASHA: Optuna records it as PRUNED, not as a finished trial at a partial value
            metrics = (
                self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
            )
            result = {k: v for k, v in result.items() if k not in metrics}
        self.searcher.on_trial_complete(trial_id, result, error)

    # Tune saves a wrapper's own state with get_state() and the wrapped searcher separately (save_to_dir)
    def get_state(self) -> dict[str, Any]:
        return {"pending": self.pending, "reference_trials": self.reference_trials}

    def set_state(self, state: dict[str, Any]) -> None:
        self.pending = state["pending"]
        self.reference_trials = state["reference_trials"]


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, able to pickle (Tune pickles the searcher into its experiment state; Optuna's
    genetic samplers hold a thread lock since 5.1): the lock is left out and made anew when restored."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()

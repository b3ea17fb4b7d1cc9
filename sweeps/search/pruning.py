"""The Tune callback (run in the driver) that deletes, after each trial ends, the weights of the trials that
can no longer be kept (:func:`rpsft.sweeps.retention.prune`). A module-level class, so Tune's pickled experiment
restores it on resume."""

from __future__ import annotations

from typing import Any

from ray import tune
from rpsft.sweeps.retention import prune


class CheckpointPruner(tune.Callback):
    def __init__(self, config: Any, context: Any) -> None:
        self.config, self.context = config, context
        self.item_cache: dict[str, Any] = {}  # finished runs' item scores (the choice is made on their split)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the callback into its experiment state
        return {**self.__dict__, "item_cache": {}}

    def on_trial_complete(self, iteration, trials, trial, **info):
        from rpsft.sweeps.store import tracking
        from rpsft.sweeps.store.sweep_store import SweepStore

        context = self.context
        client = tracking.client_for(context.tracking_uri)
        records = SweepStore.of(self.config).trials(context)
        cache = self.__dict__.setdefault("item_cache", {})  # a pruner pickled before the cache existed
        prune(
            self.config,
            records,
            final=False,
            client=client,
            parent_run_id=context.parent_run_id,
            item_cache=cache,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial, **info)

"""The Tune callback (run in the driver) that deletes, after each trial ends, the weights of the trials that
can no longer be kept (:func:`sweeps.checkpoints.prune`). A module-level class, so Tune's pickled experiment
restores it on resume."""

from __future__ import annotations

from typing import Any

from ray import tune

from sweeps.checkpoints import prune


class CheckpointPruner(tune.Callback):
    def __init__(self, config: Any, context: Any) -> None:
        self.config, self.context = config, context

    def on_trial_complete(self, iteration, trials, trial, **info):
        from sweeps import tracking
        from sweeps.store import read_trials

        context = self.context
        client = tracking.client_for(context.tracking_uri)
        prune(self.config, read_trials(client, context.experiment_id, context.parent_run_id), final=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial, **info)

"""Faults the fault-tolerance tests inject into real sweeps, as a trial hook (``rpsft.sweeps.trial.hooks``):

    hooks: [{path: "fault_hooks:Fault", args: {match: "[ref] lora", times: 1}}]

``match`` is a substring of the trial labels to hit (``[ref] lora``, ``k=8``); ``times`` (default 1) is how many
attempts of each such trial raise :class:`InjectedFault` before one runs normally; ``at_step`` (default: before
training) raises after that optimizer step instead, like a worker lost mid-training. Injected faults are counted
in ``<sweep dir>/faults/<trial id>``, so a retried trial (``failure.max_retries``) or a resumed sweep sees the
count.

An outage of a service is injected the same way: with ``command``, a matching trial runs that shell command
once instead of raising, after optimizer step ``at_step`` or, without it, at the trial's end (after its MLflow
writes, before it reports its result to the driver). The command can stop a server and start it again later in
the background (``services.py``'s outage scripts).

The trials' Ray workers import this module by its path: :func:`sweep_helpers.fault_hooks` puts this directory on
``PYTHONPATH``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from rpsft.sweeps.trial.hooks import TrialContext, TrialHook
from transformers import TrainerCallback


class InjectedFault(RuntimeError):
    """The fault this hook raises."""


class Fault(TrialHook):
    def __init__(self, match: str, times: int = 1, at_step: int | None = None, command: str | None = None):
        self.match, self.times, self.at_step, self.command = match, times, at_step, command

    def _hits(self, trial: TrialContext) -> bool:
        return bool(self.match) and self.match in trial.label

    def fire(self, trial: TrialContext, where: str) -> None:
        """Raise (or run the command) unless ``times`` faults were injected into this trial already."""
        counter = Path(trial.sweep_dir) / "faults" / trial.trial_id
        injected = int(counter.read_text()) if counter.exists() else 0
        if injected >= self.times:
            return
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(injected + 1))
        if self.command:
            subprocess.run(self.command, shell=True, check=True, timeout=120)
            return
        raise InjectedFault(
            f"injected fault {injected + 1} of {self.times} in trial {trial.trial_id} ({trial.label}) {where}"
        )

    def before_training(self, trial: TrialContext) -> None:
        if self._hits(trial) and self.at_step is None and not self.command:
            self.fire(trial, "before training")

    def training_callbacks(self, trial: TrialContext) -> list[TrainerCallback]:
        if self._hits(trial) and self.at_step is not None:
            return [_AfterStep(self, trial, self.at_step)]
        return []

    def at_trial_end(self, trial: TrialContext) -> None:
        if self._hits(trial) and self.command and self.at_step is None:
            self.fire(trial, "at the end")


class _AfterStep(TrainerCallback):
    def __init__(self, fault: Fault, trial: TrialContext, step: int) -> None:
        self.fault, self.trial, self.step = fault, trial, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.fault.fire(self.trial, f"after step {self.step}")


class HoldMidTrial(TrialHook):
    """A trial held mid-training, for the test to kill its node or its driver: on the first attempt of a matching
    trial, after optimizer step ``at_step``, write this worker's Ray node id to ``<sweep dir>/held/<trial id>``
    and wait (at most ``hold_s``). Later attempts (a retry on another node, a resumed sweep) run normally."""

    def __init__(self, match: str, at_step: int, hold_s: float = 300.0):
        self.match, self.at_step, self.hold_s = match, at_step, hold_s

    def training_callbacks(self, trial: TrialContext) -> list[TrainerCallback]:
        if self.match in trial.label and trial.attempt == 1:
            return [_HoldAfterStep(self, trial)]
        return []


class _HoldAfterStep(TrainerCallback):
    def __init__(self, hook: HoldMidTrial, trial: TrialContext) -> None:
        self.hook, self.trial = hook, trial

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.hook.at_step:
            return
        import time

        import ray

        marker = Path(self.trial.sweep_dir) / "held" / self.trial.trial_id
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(ray.get_runtime_context().get_node_id())
        time.sleep(self.hook.hold_s)  # the node or the driver dies here (past hold_s, the test has failed)

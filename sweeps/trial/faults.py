"""Fault injection for the fault-tolerance tests: make chosen trials raise on their first attempts.

``RPSFT_INJECT_FAULT`` holds a substring of the trial labels to hit (``[ref] lora``, ``k=8``);
``RPSFT_INJECT_FAULT_TIMES`` (default 1) is how many attempts of each such trial raise before one runs
normally; ``RPSFT_INJECT_FAULT_AT_STEP`` (default: before training) raises after that optimizer step instead,
like a worker lost mid-training. Attempts are counted in ``<sweep dir>/faults/<trial id>``, so a retried trial
(``failure.max_retries``) or a resumed sweep sees the count. Unset, nothing is injected.

An outage of a service is injected the same way: with ``RPSFT_INJECT_COMMAND`` set, a matching trial runs that
shell command once instead of raising, after optimizer step ``RPSFT_INJECT_FAULT_AT_STEP`` or, unset, at its
end (after its MLflow writes, before it reports its result to the driver). The command can stop a server and
start it again later in the background.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ENV_MATCH = "RPSFT_INJECT_FAULT"
ENV_TIMES = "RPSFT_INJECT_FAULT_TIMES"
ENV_AT_STEP = "RPSFT_INJECT_FAULT_AT_STEP"
ENV_COMMAND = "RPSFT_INJECT_COMMAND"


class InjectedFault(RuntimeError):
    """The fault this module raises."""


class _Fault:
    def __init__(self, sweep_dir: Path, trial_id: str, label: str) -> None:
        self.counter = Path(sweep_dir) / "faults" / trial_id
        self.trial_id, self.label = trial_id, label
        self.times = int(os.environ.get(ENV_TIMES, "1"))

    def fire(self, where: str) -> None:
        raised = int(self.counter.read_text()) if self.counter.exists() else 0
        if raised < self.times:
            self.counter.parent.mkdir(parents=True, exist_ok=True)
            self.counter.write_text(str(raised + 1))
            command = os.environ.get(ENV_COMMAND)
            if command:
                subprocess.run(command, shell=True, check=True, timeout=120)
                return
            raise InjectedFault(
                f"injected fault {raised + 1} of {self.times} in trial {self.trial_id} ({self.label}) {where}"
            )


class _StepFault(TrainerCallback):
    def __init__(self, fault: _Fault, step: int) -> None:
        self.fault, self.step = fault, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.fault.fire(f"after step {self.step}")


def _matches(label: str) -> bool:
    match = os.environ.get(ENV_MATCH)
    return bool(match) and match in label


def maybe_inject(sweep_dir: Path, trial_id: str, label: str) -> list[TrainerCallback]:
    """Raise :class:`InjectedFault` now when ``label`` matches and no step is set; with
    ``RPSFT_INJECT_FAULT_AT_STEP``, the Trainer callback that raises after that step. Unmatched: nothing."""
    if not _matches(label):
        return []
    fault = _Fault(sweep_dir, trial_id, label)
    step = os.environ.get(ENV_AT_STEP)
    if step:
        return [_StepFault(fault, int(step))]
    if not os.environ.get(ENV_COMMAND):
        fault.fire("before training")
    return []


def at_trial_end(sweep_dir: Path, trial_id: str, label: str) -> None:
    """Run ``RPSFT_INJECT_COMMAND`` when ``label`` matches and no step is set (a trial's last act)."""
    if _matches(label) and os.environ.get(ENV_COMMAND) and not os.environ.get(ENV_AT_STEP):
        _Fault(sweep_dir, trial_id, label).fire("at the end")

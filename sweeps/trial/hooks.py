"""Trial hooks: your code, called at fixed points of every sweep trial, named by import path in the sweep config.

    hooks:
      - path: mypackage.trial_hooks:Notify     # module:Name, a subclass of TrialHook
        args: {channel: sweeps}                # keyword arguments of Name

Each attempt of a trial (its first run, a ``failure.max_retries`` retry, a rerun by ``rpsft sweep resume``)
makes one instance of every hook, ``Name(**args)``, in the trial's process, and calls, in the config's order:

- :meth:`TrialHook.before_training`: the trial's MLflow run is open, nothing is loaded or trained yet;
- :meth:`TrialHook.training_callbacks`: Hugging Face ``TrainerCallback`` objects added to the trial's Trainer, so
  a hook can act during training (``on_step_end`` after optimizer step N, ...);
- :meth:`TrialHook.at_trial_end`: the trial's results are written and its MLflow run is FINISHED; the trial has
  not yet reported its result to Ray Tune.

Whatever a hook raises fails the attempt as any error of the trial does (recorded FAILED with its reason, rerun
under ``failure.max_retries``). A trial whose run finished before a crash is not trained again, and calls no
hook. A trial over several workers (``resources.workers > 1``) trains without the Hugging Face Trainer: it calls
``before_training`` and ``at_trial_end``, and fails if a hook returns training callbacks.

The path is imported when the config is loaded and again in every trial's Ray worker, so its module must be
importable in both: an installed package, or a directory on ``PYTHONPATH`` (a sweep with hooks hands the
driver's ``PYTHONPATH`` to its workers).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

if TYPE_CHECKING:
    from transformers import TrainerCallback

ATTEMPTS_DIR = "hooks"  # <sweep dir>/hooks/<trial id>: the attempts of the trial started with hooks configured


@dataclass(frozen=True)
class TrialContext:
    """What a hook learns about the trial it runs in."""

    sweep_dir: Path  # the sweep's directory (<output_dir>/<name>)
    trial_id: str  # Ray Tune's trial id, as tagged on the trial's MLflow run
    label: str  # the trial's label in the driver's table (``[ref] sft``, ``k=8 lambda=0.3 ...``)
    attempt: int  # 1 on the trial's first attempt, then one more per retry or resumed rerun


class TrialHook:
    """A trial hook: subclass it and override the points you need (each does nothing by default). The
    constructor takes the config's ``args`` as keyword arguments."""

    def before_training(self, trial: TrialContext) -> None:
        """Called before anything of the trial is loaded or trained."""

    def training_callbacks(self, trial: TrialContext) -> list[TrainerCallback]:
        """Hugging Face ``TrainerCallback`` objects for the trial's Trainer."""
        return []

    def at_trial_end(self, trial: TrialContext) -> None:
        """Called after the trial's MLflow writes, before it reports its result to Ray Tune."""


def resolve_hook(path: str) -> type[TrialHook]:
    """The :class:`TrialHook` subclass ``path`` (``module:Name``) names; ``ValueError`` saying what is wrong
    and the fix otherwise."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(
            f"{path!r} is not an import path. Fix: write it as module:Name, e.g. mypackage.trial_hooks:Notify"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"module {module_name!r} cannot be imported ({exc}). Fix: install the package that holds it, or put "
            "its directory on PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ValueError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}. Fix: correct the module"
        ) from None
    hook = getattr(module, name, None)
    if hook is None:
        raise ValueError(f"module {module_name!r} has no {name!r}. Fix: name a class the module defines")
    if not (isinstance(hook, type) and issubclass(hook, TrialHook)):
        raise ValueError(
            f"{path} is not a subclass of rpsft.sweeps.trial.hooks.TrialHook. Fix: derive it from TrialHook"
        )
    return hook


class HookSpec(BaseModel):
    """One entry of a sweep's ``hooks``: a :class:`TrialHook` subclass by import path, and its arguments."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="module:Name of a TrialHook subclass, importable by the driver and the trials")
    args: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="keyword arguments of Name"
    )

    @field_validator("path")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_hook(value)
        return value

    @field_validator("args")
    @classmethod
    def _fits_the_constructor(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        path = info.data.get("path")
        if path is None:  # the path itself is wrong (reported on its own)
            return value
        params = inspect.signature(resolve_hook(path)).parameters.values()
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        unknown = [] if takes_any else [name for name in value if name not in named]
        missing = [p.name for p in params if p.name in named and p.default is p.empty and p.name not in value]
        problems = [
            f"{what} {', '.join(map(repr, names))}"
            for what, names in (("unknown argument", unknown), ("missing argument", missing))
            if names
        ]
        if problems:
            raise ValueError(
                f"{'; '.join(problems)} for {path}, which takes {', '.join(named) or 'no arguments'}. Fix: pass "
                "the keyword arguments its constructor takes"
            )
        return value

    def make(self) -> TrialHook:
        return resolve_hook(self.path)(**self.args)


def start_attempt(specs: list[HookSpec], sweep_dir: Path, trial_id: str, label: str) -> TrialHooks:
    """The hooks of one attempt of a trial: its attempt number counted in ``<sweep dir>/hooks/<trial id>``
    (so a retried trial or a resumed sweep counts on), and one instance of every hook. Without hooks: none,
    and nothing is counted."""
    if not specs:
        return TrialHooks(None, [], [])
    counter = Path(sweep_dir) / ATTEMPTS_DIR / trial_id
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.parent.mkdir(parents=True, exist_ok=True)
    counter.write_text(str(attempt))
    trial = TrialContext(Path(sweep_dir), trial_id, label, attempt)
    return TrialHooks(trial, [spec.make() for spec in specs], [spec.path for spec in specs])


@dataclass
class TrialHooks:
    """One attempt's hook instances, called together at each point."""

    trial: TrialContext | None  # None without hooks
    hooks: list[TrialHook]
    paths: list[str]

    def before_training(self) -> None:
        for hook in self.hooks:
            hook.before_training(self.trial)

    def training_callbacks(self, distributed: bool = False) -> list[TrainerCallback]:
        """Every hook's Trainer callbacks; a trial over several workers has no Trainer to add them to."""
        callbacks = []
        for i, hook in enumerate(self.hooks):
            own = list(hook.training_callbacks(self.trial))
            if own and distributed:
                raise ValueError(
                    f"hooks[{i}] ({self.paths[i]}) returned training callbacks, but a trial over several workers "
                    "(resources.workers > 1) trains without the Hugging Face Trainer. Fix: resources.workers: 1, "
                    "or return no training callbacks"
                )
            callbacks += own
        return callbacks

    def at_trial_end(self) -> None:
        for hook in self.hooks:
            hook.at_trial_end(self.trial)

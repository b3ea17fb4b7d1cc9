"""Trial hooks (``hooks:`` of a sweep config, ``rpsft.sweeps.trial.hooks``): the import path and arguments are
checked when the config is loaded, naming the entry and the fix; an attempt makes the hooks, counts itself and
calls them in order. Real sweeps with hooks run in test_faults.py and test_outages.py."""

from __future__ import annotations

import pytest
from rpsft.sweeps.trial.hooks import TrialHook
from transformers import TrainerCallback

CALLS: list[tuple[str, str, int, str]] = []  # (hook name, point, attempt, label) in call order


class Recorder(TrialHook):
    """Records each call; ``step_callback`` makes it hand the Trainer one callback."""

    def __init__(self, name: str, step_callback: bool = False) -> None:
        self.name, self.step_callback = name, step_callback

    def before_training(self, trial):
        CALLS.append((self.name, "before_training", trial.attempt, trial.label))

    def training_callbacks(self, trial):
        CALLS.append((self.name, "training_callbacks", trial.attempt, trial.label))
        return [TrainerCallback()] if self.step_callback else []

    def at_trial_end(self, trial):
        CALLS.append((self.name, "at_trial_end", trial.attempt, trial.label))


class NotAHook:
    pass


def _parse(hooks):
    from rpsft.sweeps.config.sweep import parse_sweep_config

    return parse_sweep_config({"name": "hooked", "hooks": hooks})


def test_a_hook_entry_is_loaded_and_round_trips():
    config = _parse([{"path": "test_trial_hooks:Recorder", "args": {"name": "a"}}])
    assert [(h.path, h.args) for h in config.hooks] == [("test_trial_hooks:Recorder", {"name": "a"})]
    assert type(config).model_validate(config.model_dump(mode="json", by_alias=True)) == config  # sweep.json
    assert _parse([]).hooks == []


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"path": "no_such_module_for_hooks:Hook"},
            "hooks[0].path: module 'no_such_module_for_hooks' cannot be imported (No module named "
            "'no_such_module_for_hooks'). Fix: install the package that holds it, or put its directory on PYTHONPATH",
        ),
        ({"path": "test_trial_hooks"}, "hooks[0].path: 'test_trial_hooks' is not an import path. Fix: write it"),
        ({"path": "test_trial_hooks:Missing"}, "hooks[0].path: module 'test_trial_hooks' has no 'Missing'. Fix:"),
        (
            {"path": "test_trial_hooks:NotAHook"},
            "hooks[0].path: test_trial_hooks:NotAHook is not a subclass of rpsft.sweeps.trial.hooks.TrialHook. "
            "Fix: derive it from TrialHook",
        ),
        (
            {"path": "test_trial_hooks:Recorder", "args": {"nam": "a"}},
            "hooks[0].args: unknown argument 'nam'; missing argument 'name' for test_trial_hooks:Recorder, which "
            "takes name, step_callback. Fix: pass the keyword arguments its constructor takes",
        ),
        (
            {"path": "test_trial_hooks:Recorder"},
            "hooks[0].args: missing argument 'name' for test_trial_hooks:Recorder",
        ),
        ({"path": "test_trial_hooks:Recorder", "arg": {}}, "hooks[0].arg: Extra inputs are not permitted"),
    ],
)
def test_a_bad_hook_entry_is_refused_at_load_naming_it_and_the_fix(entry, message):
    from rpsft.sweeps.config.errors import SweepConfigError

    good = {"path": "test_trial_hooks:Recorder", "args": {"name": "a"}}
    with pytest.raises(SweepConfigError) as refused:
        _parse([good, entry])
    assert message.replace("hooks[0]", "hooks[1]") in str(refused.value)
    assert "hooks[0]" not in str(refused.value)


def test_an_attempt_counts_itself_and_calls_every_hook_in_order(tmp_path):
    from rpsft.sweeps.trial.hooks import HookSpec, start_attempt

    specs = [
        HookSpec(path="test_trial_hooks:Recorder", args={"name": "first", "step_callback": True}),
        HookSpec(path="test_trial_hooks:Recorder", args={"name": "second"}),
    ]
    CALLS.clear()
    for expected_attempt in (1, 2):
        hooks = start_attempt(specs, tmp_path, "trial_0001", "[ref] sft")
        assert hooks.trial.sweep_dir == tmp_path and hooks.trial.trial_id == "trial_0001"
        hooks.before_training()
        callbacks = hooks.training_callbacks()
        hooks.at_trial_end()
        assert len(callbacks) == 1 and isinstance(callbacks[0], TrainerCallback)
        assert CALLS == [
            (name, point, expected_attempt, "[ref] sft")
            for point in ("before_training", "training_callbacks", "at_trial_end")
            for name in ("first", "second")
        ]
        CALLS.clear()
    assert (tmp_path / "hooks" / "trial_0001").read_text() == "2"
    start_attempt(specs[1:], tmp_path, "trial_0002", "k=8")
    assert (tmp_path / "hooks" / "trial_0002").read_text() == "1"  # counted per trial


def test_without_hooks_nothing_is_counted_or_called(tmp_path):
    from rpsft.sweeps.trial.hooks import start_attempt

    hooks = start_attempt([], tmp_path, "trial_0001", "[ref] sft")
    hooks.before_training()
    assert hooks.training_callbacks(distributed=True) == []
    hooks.at_trial_end()
    assert not (tmp_path / "hooks").exists()


def test_training_callbacks_in_a_trial_over_several_workers_fail_naming_the_hook(tmp_path):
    from rpsft.sweeps.trial.hooks import HookSpec, start_attempt

    specs = [
        HookSpec(path="test_trial_hooks:Recorder", args={"name": "quiet"}),
        HookSpec(path="test_trial_hooks:Recorder", args={"name": "steps", "step_callback": True}),
    ]
    hooks = start_attempt(specs, tmp_path, "trial_0001", "[ref] sft")
    with pytest.raises(ValueError, match=r"hooks\[1\] \(test_trial_hooks:Recorder\) returned training callbacks"):
        hooks.training_callbacks(distributed=True)
    assert start_attempt(specs[:1], tmp_path, "trial_0001", "[ref] sft").training_callbacks(distributed=True) == []

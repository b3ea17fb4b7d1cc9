"""The sweep's evaluation section holds the evaluation's own settings types (LossSettings, MCSettings,
EvalSettings): what a trial is scored with equals what `rpsft eval` builds from the same fields."""

from __future__ import annotations

import json

import pytest


def _raw(tmp_path, **evaluation) -> dict:
    return {
        "name": "evalcfg",
        "model": "smollm2-135m-instruct",
        "data": "demo-math:16",
        "output_dir": str(tmp_path / "sweeps"),
        "train": {"max_steps": 2, "batch_size": 2, "max_length": 64},
        "space": {"k": [4], "lambda": [1.0]},
        "references": ["sft"],
        "evaluation": {"data_dir": str(tmp_path / "data"), "subset": "test", **evaluation},
    }


def _parse(raw):
    from rpsft.sweeps.config.sweep import parse_sweep_config

    return parse_sweep_config(raw)


def test_loss_section_is_loss_settings_with_the_section_data(tmp_path):
    from rpsft.evaluation.loss_metrics import LossSettings

    loss = {
        "n_id": 3,
        "n_ood": 5,
        "id_benchmarks": ["math500"],
        "max_new_tokens": 32,
        "max_length": 256,
        "kl": True,
    }
    config = _parse(_raw(tmp_path, loss=loss))
    assert isinstance(config.evaluation.loss, LossSettings)
    expected = LossSettings(**loss, data_dir=str(tmp_path / "data"), subset="test", cache_dir="/c")
    assert config.evaluation.loss_settings("/c") == expected


def test_loss_fields_left_out_take_the_sweep_defaults(tmp_path):
    from rpsft.evaluation.loss_metrics import LossSettings
    from rpsft.sweeps.config.evaluation import SWEEP_LOSS_DEFAULTS

    config = _parse(_raw(tmp_path, loss={"n_id": 3}))
    loss = config.evaluation.loss
    for field, value in SWEEP_LOSS_DEFAULTS.items():
        if field != "n_id":
            assert getattr(loss, field) == value
    assert loss.n_id == 3
    # fields without a sweep default are LossSettings' own (one set of benchmark defaults)
    assert loss.id_benchmarks == LossSettings().id_benchmarks
    assert loss.ood_benchmarks == LossSettings().ood_benchmarks
    # an explicit null (as older sweep state files hold) also means the default benchmarks
    old = _parse(_raw(tmp_path, loss={"n_id": 3, "id_benchmarks": None, "ood_benchmarks": None}))
    assert old.evaluation.loss == loss


@pytest.mark.parametrize(
    "evaluation, field, fix",
    [
        ({"loss": {"n_id": 0}}, "evaluation.loss.n_id", "greater than or equal to 1"),
        ({"loss": {"bogus": 1}}, "evaluation.loss.bogus", "Extra inputs"),
        ({"loss": {"data_dir": "/elsewhere"}}, "evaluation.loss", "Fix: evaluation.data_dir"),
        ({"harness": {"limit": 0}}, "evaluation.harness.limit", "greater than or equal to 1"),
        ({"harness": {"suite": 3}}, "evaluation.harness.suite", "valid list"),
        ({"mc": {"n": 0}}, "evaluation.mc.n", "greater than or equal to 1"),
    ],
)
def test_bad_evaluation_fields_are_named(tmp_path, evaluation, field, fix):
    from rpsft.sweeps.config.errors import SweepConfigError

    with pytest.raises(SweepConfigError) as err:
        _parse(_raw(tmp_path, **evaluation))
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(f"- {field}"))
    assert fix in line, str(err.value)


def test_harness_settings_equal_what_rpsft_eval_builds(tmp_path):
    from rpsft.evaluation.settings import EvalSettings, load_eval_settings

    harness = {"suite": "id", "exclude": ["supergpqa"], "limit": 4, "batch_size": 16}
    raw = _raw(tmp_path, harness=harness)
    raw["objective"] = {"betas": [2.0, 0.5]}
    config = _parse(raw)
    assert isinstance(config.evaluation.harness, EvalSettings)
    expected = load_eval_settings(
        None,
        {
            **harness,
            "data_dir": str(tmp_path / "data"),
            "subset": "test",
            "betas": [2.0, 0.5],
            "cache_dir": "/c",
        },
    )
    assert config.evaluation.harness_settings(config.objective.betas, "/c") == expected


def test_harness_keeps_its_own_data_and_follows_the_section_otherwise(tmp_path):
    own = _parse(_raw(tmp_path, harness={"subset": "full", "data_dir": "/own"}))
    settings = own.evaluation.harness_settings([1.0])
    assert (settings.subset, settings.data_dir) == ("full", "/own")
    follows = _parse(_raw(tmp_path, harness={"limit": 2}))
    settings = follows.evaluation.harness_settings([1.0])
    assert (settings.subset, settings.data_dir) == ("test", str(tmp_path / "data"))


def test_harness_betas_are_the_objectives_and_its_own_are_an_unknown_key(tmp_path):
    from rpsft.sweeps.config.errors import SweepConfigError

    config = _parse(_raw(tmp_path, harness={"limit": 2}))
    betas = config.objective.betas
    assert config.evaluation.harness_settings(betas, "/c").betas == betas
    assert config.evaluation.harness_settings(betas, "/c").cache_dir == "/c"
    for key, value in (("betas", [9.0]), ("cache_dir", "/elsewhere")):
        with pytest.raises(SweepConfigError) as refused:
            _parse(_raw(tmp_path, harness={"limit": 2, key: value}))
        assert f"evaluation.harness.{key}: Extra inputs are not permitted" in str(refused.value)


def test_mc_reads_the_section_data(tmp_path):
    config = _parse(_raw(tmp_path, mc={"n": 3, "data_dir": "/ignored"}))
    settings = config.evaluation.mc_settings()
    assert (settings.n, settings.data_dir, settings.subset) == (3, str(tmp_path / "data"), "test")


def test_dumped_config_loads_back_and_follows_a_moved_data_dir(tmp_path):
    """A sweep's stored config (sweep.json) holds the sections as given: it validates back to the same
    config, and a changed evaluation.data_dir (as the runner makes it absolute) moves every part with it."""
    from rpsft.sweeps.config.sweep import SweepConfig

    config = _parse(_raw(tmp_path, loss={"n_id": 2}, harness={"limit": 2}, mc={"n": 2}))
    dumped = json.loads(config.model_dump_json(by_alias=True))
    assert "data_dir" not in dumped["evaluation"]["loss"]
    assert dumped["evaluation"]["harness"] == {"limit": 2}
    assert SweepConfig.model_validate(dumped) == config
    dumped["evaluation"]["data_dir"] = "/moved"
    moved = SweepConfig.model_validate(dumped).evaluation
    assert moved.loss_settings().data_dir == "/moved"
    assert moved.mc_settings().data_dir == "/moved"
    assert moved.harness_settings([1.0]).data_dir == "/moved"


def test_the_default_loss_section_is_the_sweep_loss_settings():
    import rpsft.sweeps.config.evaluation as sweep_config

    assert sweep_config.EvaluationConfig().loss == sweep_config.sweep_loss_settings()
    assert sweep_config.sweep_loss_settings({"n_id": 3}).n_id == 3

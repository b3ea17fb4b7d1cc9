"""The searched space as Optuna and Ray Tune read it: each knob's distribution, the define-by-run space, the
searcher (references first, then Optuna) and the trial scheduler (FIFO or ASHA)."""

from __future__ import annotations

import functools
from typing import Any

from rpsft.sweeps.config.sweep import SweepConfig

SEARCHED_KNOBS = ("k", "lambda", "layers", "period", "penalty_mode")  # the space's knobs, in Optuna's order


def _integer_ranks(dim: dict[str, Any]) -> bool:
    """A k range of whole ranks (``{low: 8, high: 256}``); otherwise it is a range of rank fractions."""
    return float(dim["low"]).is_integer() and float(dim["high"]).is_integer() and dim["high"] > 1


def search_distributions(dims: dict[str, Any]) -> dict[str, Any]:
    """The Optuna distribution of each searched knob of ``dims`` (see :func:`search_dims`): a list is
    categorical, a k range of whole ranks integer, any other range float (log-scaled when asked)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name in (n for n in SEARCHED_KNOBS if n in dims):
        dim = dims[name]
        if not isinstance(dim, dict):
            out[name] = CategoricalDistribution(dim)
        elif name == "k" and _integer_ranks(dim):
            out[name] = IntDistribution(int(dim["low"]), int(dim["high"]), log=dim["log"])
        else:
            out[name] = FloatDistribution(dim["low"], dim["high"], log=dim["log"])
    return out


def optuna_space(space: dict[str, Any], trial: Any) -> None:
    """Optuna define-by-run space (a module-level function, so the searcher pickles for resume)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    for name, dist in search_distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def search_dims(config: SweepConfig) -> dict[str, Any]:
    """The searched knobs as :func:`optuna_space` reads them: a list of choices or a ``{low, high, log}``."""
    space = config.space
    dims = {
        "k": space.k.model_dump() if hasattr(space.k, "model_dump") else list(space.k),
        "lambda": space.lam.model_dump() if hasattr(space.lam, "model_dump") else list(space.lam),
        "layers": space.layer_labels(),
        "period": list(space.period),
    }
    # a space of only `loss` adds no dimension: its studies, seeded draws and trial parameters stay as they were
    if space.searches_penalty_mode:
        dims["penalty_mode"] = list(space.penalty_mode)
    return dims


def build_searcher(config: SweepConfig, storage: Any, warm_started: bool = False) -> Any:
    """Tune's Optuna searcher behind the references. The default algorithm starts from a space-filling
    design, unless earlier sweeps' trials already inform it (``warm_started``)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    from rpsft.sweeps.search.initial_design import initial_design
    from rpsft.sweeps.search.searcher import PicklableNSGAIISampler, ReferencesFirst

    dims = search_dims(config)
    seed = config.search.seed
    design = None
    if config.search.algorithm == "auto" and config.search.num_trials > 0 and not warm_started:
        design = initial_design(search_distributions(dims), config.search.num_trials, seed)
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=len(design) if design else max(2, config.search.num_trials // 3)
        ),
        "nsga2": lambda: PicklableNSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler(
            {name: dims[name] for name in SEARCHED_KNOBS if name in dims}, seed=seed
        ),
        "qmc": lambda: optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed),
    }[config.algorithm]()
    if config.objective.mode == "pareto":
        metric, mode = ["g_id", "f_ood"], ["max", "min"]
    else:
        metric, mode = "objective", "max"
    search = OptunaSearch(
        space=functools.partial(optuna_space, dims),
        metric=metric,
        mode=mode,
        sampler=sampler,
        study_name=config.name,
        storage=storage,
        points_to_evaluate=design,
    )
    return ReferencesFirst(search, config.reference_params())


def build_scheduler(config: SweepConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.scheduler_type == "asha":
        return ASHAScheduler(
            time_attr="step",
            metric="objective",
            mode="max",
            max_t=config.max_steps,
            grace_period=config.scheduler.grace_steps,
            reduction_factor=config.scheduler.reduction_factor,
        )
    return FIFOScheduler()

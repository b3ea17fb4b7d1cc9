"""The sweep driver: validate, prepare shared state once, run the trials with Ray Tune, select, summarize.

    from rpsft.sweeps import load_sweep_config
    from rpsft.sweeps import run_sweep
    from rpsft.sweeps import resume_sweep
    outcome = run_sweep(load_sweep_config("sweeps/configs/demo.yaml"))
    outcome = resume_sweep("demo")          # after a crash or kill: finished trials are not rerun

State lives under ``<output_dir>/<name>/`` (the layout is :class:`rpsft.sweeps.store.sweep_store.SweepStore`'s): ``sweep.json``
(config, MLflow ids, shared context), ``tune/`` (Ray Tune's experiment, restored by :func:`resume_sweep`),
``optuna.db`` (default Optuna storage), ``trials/<trial id>/``, ``bases/``, ``exports/<trial id>/`` and ``rl/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpsft.core.method_table import method_spec
from rpsft.sweeps import preflight
from rpsft.sweeps.analysis.selection import Selection, select
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig, input_path_slots
from rpsft.sweeps.driver_guard import NotYetThere, driver_lock, local_storage_file, nothing_left_when_refused
from rpsft.sweeps.ray_session import init_ray
from rpsft.sweeps.search.space import build_scheduler, build_searcher, search_dims, search_distributions
from rpsft.sweeps.shared_storage import check_every_node_sees
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import (
    DEFAULT_ROOT,
    INTERVALS,
    TUNE_DIR,
    SweepContext,
    SweepStore,
    TrialRecord,
)
from rpsft.sweeps.trial.run import run_trial


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: list[TrialRecord]  # one per trial run, in start order
    selection: Selection | None


# ----------------------------------------------------------------------------------------------- paths


def absolutize(config: SweepConfig) -> SweepConfig:
    """Relative paths resolved against the current directory (Ray runs trials in their own directories)."""

    def existing(value: str | None) -> str | None:
        if value and not value.startswith(("hf:", "demo-math")) and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    data = config.model_dump(mode="json", by_alias=True)
    for _, container, key in input_path_slots(data):  # a registry task or hub id stays a name
        container[key] = existing(container[key])
    data["evaluation"]["data_dir"] = str(Path(config.evaluation.data_dir).expanduser().resolve())
    data["output_dir"] = str(Path(config.output_dir).expanduser().resolve())
    if config.cache_dir:
        data["cache_dir"] = str(Path(config.cache_dir).expanduser().resolve())
    return SweepConfig.model_validate(data)


def storage_urls(config: SweepConfig) -> tuple[str, str]:
    """``(optuna storage, mlflow tracking URI)`` with the SQLite defaults filled in."""
    root = Path(config.output_dir)
    optuna_url = config.storage.optuna or f"sqlite:///{SweepStore.of(config).optuna_db}"
    mlflow_uri = config.storage.mlflow or f"sqlite:///{root / 'mlflow.db'}"
    return optuna_url, mlflow_uri


def cache_root(config: SweepConfig) -> Path:
    from rpsft.core.models import default_cache_dir

    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


DRIVER_MEMORY_BYTES = 512 * 2**20  # what a trial that drives Ray Train workers reserves (no CPU, no GPU)


def trainable(config: SweepConfig, context: SweepContext) -> Any:
    from ray import tune

    if config.resources.distributed:  # the trial only drives its Ray Train workers, which hold the CPUs/GPUs
        resources = {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY_BYTES}
    else:
        resources = {"cpu": config.resources.cpus, "gpu": config.resources.gpus}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def _reporter(config: SweepConfig) -> Any:
    from ray.tune import CLIReporter

    columns = {
        "progress": "step",
        "eta": "ETA",
        "objective": "Phi",
        "g_id": "G_id",
        "f_ood": "F_ood",
        "reference_objective": "ref Phi",
    }
    return CLIReporter(
        parameter_columns={"method": "method", "k": "k", "lambda": "lambda", "layers": "layers"},
        metric_columns=columns,
        max_report_frequency=30,
        max_column_length=14,
    )


def run_tuner(
    config: SweepConfig, context: SweepContext, storage: Any, restore: bool, warm_started: bool = False
) -> set[str]:
    """Run (or restore) the Tune experiment to its end; returns the ids of the trials Tune knows."""
    from ray import tune

    # reference trials report their Phi under another key, so ASHA and Optuna leave them alone
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the compact CLIReporter table
    path = SweepStore.of(config).tune_dir
    from rpsft.sweeps.search.pruning import CheckpointPruner

    callbacks = [CheckpointPruner(config, context)] if config.keep.any else []
    if restore and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable(config, context), resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable(config, context),
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(config, storage, warm_started=warm_started),
                scheduler=build_scheduler(config),
                num_samples=config.num_reference_trials + config.search.num_trials,
                max_concurrent_trials=config.concurrency,
                # a new worker process per trial unless asked: a reused worker saves its start-up, but its
                # memory grows trial after trial (until Ray's monitor kills it, which ends the whole sweep)
                reuse_actors=config.reuse_workers,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(SweepStore.of(config).dir),
                failure_config=tune.FailureConfig(max_failures=config.failure.max_retries),
                progress_reporter=_reporter(config),
                verbose=1,
                callbacks=callbacks,
            ),
        )
    grid = tuner.fit()
    return {
        str(result.metrics["trial_id"]) for result in grid if result.metrics and "trial_id" in result.metrics
    }


# ----------------------------------------------------------------------------------------------- preparation


def prepare_shared_state(
    config: SweepConfig, scorer: Any, progress: bool = True
) -> tuple[dict[str, float], Path, dict[str, float]]:
    """Once per sweep: pretrained bases for every layer subset, ``k: auto`` resolution, base-model scores.

    Returns ``(auto_k, bases_dir, base_metrics)``; ``base_metrics`` are the base model's per-benchmark numbers.
    The base model's per-item scores (for the intervals) go to ``<sweep>/base_item_scores.json``.
    """
    import torch
    from rpsft.core.bases import load_or_compute_bases, resolve_k
    from rpsft.core.models import load_model, load_tokenizer
    from rpsft.core.selection import select_matrices

    cfg0 = config.trial_train_config({"k": 1, "lambda": 1.0})
    tokenizer = load_tokenizer(config.model, config.cache_dir)
    model, _ = load_model(config.model, dtype=cfg0.dtype, cache_dir=config.cache_dir)
    model.eval()

    auto_k: dict[str, float] = {}
    auto_specs = config.auto_k_specs()
    if auto_specs:
        from rpsft.core.rank_rule import resolve_k_from_prompts

        for spec in auto_specs:
            auto_k[spec] = float(
                resolve_k_from_prompts(model, tokenizer, spec, config.evaluation.auto_k_source())
            )

    store = SweepStore.of(config)
    bases_dir = store.bases_dir
    numeric = [k for k in config.space.k_choices() if not isinstance(k, str)] + list(auto_k.values())
    for ref in config.references:
        if method_spec(ref.method).sweeps_k and ref.k is not None:
            numeric.append(auto_k[ref.k] if isinstance(ref.k, str) else ref.k)
    if config.search.num_trials or numeric:
        layer_options = [config.space.layers_for(label) for label in config.space.layer_labels()]
        layer_options += [r.layers for r in config.references if r.layers is not None]
        for layers in layer_options:
            selection = select_matrices(model, layers)
            if not selection or not numeric:
                continue
            ranks = [min(w.shape) for w in selection.values()]
            # one k (a rank fraction when needed) that covers every k of the space on every matrix
            need = max(resolve_k(k, (r, r)) / r for k in numeric for r in ranks)
            ints = [k for k in numeric if isinstance(k, int)]
            k_cover: int | float = (
                max(ints) if ints and all(isinstance(k, int) for k in numeric) else min(1.0, need)
            )
            if all(resolve_k(k_cover, tuple(w.shape)) == min(w.shape) for w in selection.values()):
                continue  # full rank: each trial copies W0, nothing to share
            with torch.no_grad():
                load_or_compute_bases(
                    selection, k_cover, cache_dir=bases_dir, method=cfg0.basis_method, progress=progress
                )
    if config.evaluation.rotation:
        from rpsft.evaluation.diagnostics.rotation import left_subspaces

        with torch.no_grad():
            subspaces = left_subspaces(model, "all", top_k=config.evaluation.rotation_top_k)
        torch.save({name: u.float() for name, u in subspaces.items()}, store.rotation_base)
    from rpsft.evaluation.progress import progress_bar

    with progress_bar("base model: OOD responses and NLLs", scorer.base_work(), enabled=progress):
        base_metrics = scorer.warm_base(model, tokenizer)
    with torch.no_grad():
        base_items = scorer.base_item_scores(model, tokenizer)
    store.write_base_item_scores(base_items)
    del model
    return auto_k, bases_dir, base_metrics


# ----------------------------------------------------------------------------------------------- driver


def _base_key(config: SweepConfig) -> str:
    from rpsft.evaluation.scoring import name_fingerprint

    return name_fingerprint(config.model)


def connect_and_check(config: SweepConfig, address: str | None, storage: tuple[str, str], echo) -> None:
    """Connect to Ray (``address``, else ``storage.ray_address``, else a local instance) and check what needs the
    cluster: its resources, what every node sees (``storage``: the Optuna and MLflow URLs), one trial's memory."""
    cluster = init_ray(address or config.storage.ray_address, hooks=bool(config.hooks))
    preflight.check_resources(config, cluster)
    check_every_node_sees(config, storage)
    preflight.check_memory(config, cluster, echo=echo)


def run_sweep(
    config: SweepConfig, *, address: str | None = None, progress: bool = True, echo=print
) -> SweepOutcome:
    """Validate everything, prepare shared state, run all trials, select and tag the operating point. A sweep
    refused for bad input leaves no files behind (:func:`nothing_left_when_refused`)."""
    config = absolutize(config)
    store = SweepStore.of(config)
    storage_files = [path for url in storage_urls(config) if (path := local_storage_file(url)) is not None]
    created = NotYetThere.now(store, storage_files)
    with driver_lock(store), nothing_left_when_refused(store, created):
        return _run_sweep(config, address=address, progress=progress, echo=echo)


def _run_sweep(config: SweepConfig, *, address: str | None, progress: bool, echo) -> SweepOutcome:
    store = SweepStore.of(config)
    if store.exists():
        raise SweepConfigError(
            f"name: a sweep named {config.name!r} already exists in {store.dir}. "
            f"Fix: `rpsft sweep resume {config.name}` to finish it, or another name (--name)"
        )
    optuna_url, mlflow_uri = storage_urls(config)
    preflight.check_storage_rules(config, optuna_url, mlflow_uri)
    from rpsft.sweeps.trial.scoring import TrialScorer

    cache_dir = str(cache_root(config) / "eval")
    scorer = TrialScorer(config, base_key="", cache_dir=cache_dir)
    preflight.check_inputs(config, scorer)  # the checks that write nothing come before the storage's
    from rpsft.sweeps.search.warm_start import carry_over, check_warm_start

    earlier_sweeps = check_warm_start(config)
    storage = preflight.check_optuna_storage(optuna_url)
    preflight.check_mlflow(mlflow_uri)
    connect_and_check(config, address, (optuna_url, mlflow_uri), echo)

    echo(f"[rpsft] sweep {config.name}: preparing the base model, shared bases and base scores")
    from rpsft.core.models import resolve_model_dir

    try:
        resolve_model_dir(config.model, config.cache_dir)
    except (OSError, ValueError) as exc:
        raise SweepConfigError(f"model: {exc}") from None
    scorer.base_key = _base_key(config)
    auto_k, bases_dir, base_metrics = prepare_shared_state(config, scorer, progress=progress)
    if auto_k:
        echo(
            "[rpsft] k: "
            + ", ".join(f"{spec} -> {value:.4f} of each matrix's rank" for spec, value in auto_k.items())
        )

    client = tracking.client_for(mlflow_uri)
    artifacts = None if mlflow_uri.startswith("http") else (Path(config.output_dir) / "mlartifacts").as_uri()
    experiment_id = tracking.ensure_experiment(client, config.storage.experiment, artifacts)
    parent = tracking.create_parent_run(
        client,
        experiment_id,
        config.name,
        {
            "model": config.model,
            "data": config.data,
            "objective": f"{config.objective.mode}:{config.objective.metric}",
            "betas": config.objective.betas,
            "num_trials": config.search.num_trials,
            "references": [r.label_in(config.train) for r in config.references],
            "algorithm": config.algorithm,
            "scheduler": config.scheduler_type,
            "optuna_storage": optuna_url,
            "warm_start": config.search.warm_start or None,
        },
    )
    tracking.share_trials_view(client, experiment_id, config.name, config.objective.beta)
    tracking.log_json_artifact(
        client, parent, "sweep_config.json", config.model_dump(mode="json", by_alias=True)
    )
    # the base model's per-benchmark numbers, named as in the trial runs with a ``base/`` prefix
    tracking.log_metrics(client, parent, {f"{tracking.BASE_PREFIX}{k}": v for k, v in base_metrics.items()})
    client.log_artifact(parent, str(store.base_item_scores))
    context = SweepContext(
        config=config.model_dump(mode="json", by_alias=True),
        tracking_uri=mlflow_uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        base_key=scorer.base_key,
        cache_dir=cache_dir,
        bases_dir=str(bases_dir),
        auto_k=auto_k,
    )
    warm = carry_over(
        config,
        storage,
        search_distributions(search_dims(config)),
        earlier_sweeps if config.search.num_trials else [],
    )
    for earlier, n in warm.carried.items():
        skipped = (
            f", {warm.skipped[earlier]} outside this search space left out" if warm.skipped[earlier] else ""
        )
        echo(
            f"[rpsft] warm start: {n} finished trial(s) of sweep {earlier!r} carried into the Optuna study{skipped}"
        )
    if warm.carried:
        tracking.log_metrics(client, parent, {f"warm_start/{k}": v for k, v in warm.carried.items()})
    store.write_state(config, context, "running", optuna_url)
    echo(f"[rpsft] MLflow: {mlflow_uri}  experiment {config.storage.experiment!r}  parent run {parent}")
    known = run_tuner(config, context, storage, restore=False, warm_started=sum(warm.carried.values()) > 0)
    return finish(config, context, optuna_url, echo=echo, tune_trials=known)


def resume_sweep(
    name: str, *, root: str | Path = DEFAULT_ROOT, address: str | None = None, echo=print
) -> SweepOutcome:
    """Finish an interrupted sweep: Tune restores its trials (finished ones are kept, not rerun)."""
    store = SweepStore(Path(root), name)
    store.read_state()  # a missing sweep fails naming it, before a lock file is made
    with driver_lock(store):
        return _resume_sweep(store, address=address, echo=echo)


def _resume_sweep(store: SweepStore, *, address: str | None, echo) -> SweepOutcome:
    name = store.name
    state = store.read_state()
    context = SweepContext(**state["context"])
    config = store.config(context)
    optuna_url = state["optuna_storage"]
    storage = preflight.check_optuna_storage(optuna_url)
    preflight.check_mlflow(context.tracking_uri)
    connect_and_check(config, address, (optuna_url, context.tracking_uri), echo)
    echo(f"[rpsft] resuming sweep {name} (MLflow parent run {context.parent_run_id})")
    client = tracking.client_for(context.tracking_uri)
    client.update_run(context.parent_run_id, status="RUNNING")
    tracking.share_trials_view(client, context.experiment_id, config.name, config.objective.beta)
    store.write_state(config, context, "running", optuna_url)
    known = run_tuner(config, context, storage, restore=True)
    return finish(config, context, optuna_url, echo=echo, tune_trials=known)


def close_orphaned_optuna_trials(optuna_url: str, study_name: str) -> int:
    """Mark FAIL the Optuna trials still RUNNING once every Tune trial has ended (a driver killed between
    Optuna's ask and Tune's next experiment checkpoint leaves one that nothing will ever tell). Returns how
    many were closed."""
    import optuna
    from optuna.trial import TrialState
    from rpsft.sweeps.store.optuna_storage import optuna_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=optuna_storage(optuna_url))
    except KeyError:  # no searched trial was ever asked (a sweep of references only)
        return 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(running)


def close_lost_trial_runs(client: Any, trials: list[TrialRecord], tune_trials: set[str] | None = None) -> int:
    """Mark KILLED (state ``lost``) the trial runs Tune forgot: a driver killed between a trial's start and Tune's
    next experiment checkpoint leaves a run that Tune does not restore (it runs another trial in its place). Such
    a run is still RUNNING once the sweep's budget is done, or FINISHED if the trial ended before the kill but
    Tune never recorded it (``tune_trials``: the trial ids Tune knows); either way the sweep does not count it.
    Returns how many were closed."""
    lost = [
        trial
        for trial in trials
        if trial.running or (tune_trials and trial.status == "FINISHED" and trial.trial_id not in tune_trials)
    ]
    for trial in lost:
        tracking.set_tags(
            client,
            trial.run_id,
            {
                tracking.TAG_FAILURE: "lost: started before the sweep's driver was killed, after Tune's last "
                "experiment checkpoint; the resumed sweep ran another trial in its place"
            },
        )
        tracking.finish_run(client, trial.run_id, "KILLED", state="lost")
    return len(lost)


def _part_metrics(prefix: str, numbers: Any, beta: float) -> dict[str, float]:
    out = {f"{prefix}g_id": numbers.g_id, f"{prefix}f_ood": numbers.f_ood, f"{prefix}phi": numbers.phi}
    if numbers.intervals:
        for name, key in (("g_id", "g_id"), ("f_ood", "f_ood"), ("phi", f"phi@{beta:g}")):
            out[f"{prefix}{name}_lo"] = numbers.intervals[key].low
            out[f"{prefix}{name}_hi"] = numbers.intervals[key].high
    return out


def operating_point_metrics(parts: dict[str, Any], beta: float, n_finished: int) -> dict[str, float]:
    """The parent run's numbers of the chosen point: ``operating_point/<part>/<g_id|f_ood|phi>`` (with ``_lo`` /
    ``_hi`` where the part has intervals) of the selection and the report part (which items each is on: the
    tags ``rpsft.operating_point_<part>_items``), and ``best_*``: the report part's, the numbers reported."""
    out: dict[str, float] = {"n_finished_trials": n_finished}
    for part, numbers in parts.items():
        out.update(_part_metrics(f"operating_point/{part}/", numbers, beta))
    out.update(_part_metrics("best_", parts["report"], beta))
    return out


def finish(
    config: SweepConfig,
    context: SweepContext,
    optuna_url: str,
    echo=print,
    tune_trials: set[str] | None = None,
) -> SweepOutcome:
    """Select the operating point from MLflow, tag it, log the selection and the intervals on the parent run,
    mark done. Trials that differ only in their seed are one configuration (their mean)."""
    from rpsft.sweeps.analysis.trajectory import sweep_points
    from rpsft.sweeps.analysis.uncertainty import analyze_sweep

    store = SweepStore.of(config)
    client = tracking.client_for(context.tracking_uri)
    trials = store.trials(context)
    expected = config.num_reference_trials + config.search.num_trials
    if sum(1 for trial in trials if trial.done) >= expected:
        lost = close_lost_trial_runs(client, trials, tune_trials)
        if lost:
            echo(
                f"[rpsft] sweep {config.name}: {lost} trial run(s) started before a crash that Tune never "
                "recorded (another trial took the place): KILLED"
            )
            trials = store.trials(context)
    # every scored checkpoint with evaluation.trajectory: true, else each trial's final point
    analysis = analyze_sweep(config, client, context.parent_run_id, sweep_points(config, trials, client))
    selection = None
    if analysis.points:
        beta = config.objective.beta
        selection = select(analysis.points, beta)
        selection.attach(analysis)
        tracking.tag_operating_point(client, trials, selection.best.run_id, beta)
        tracking.log_json_artifact(client, context.parent_run_id, "selection.json", selection.to_dict())
        tracking.log_trials_table(client, context.parent_run_id, trials, beta)
        if analysis.intervals is not None:
            intervals = {**analysis.intervals.to_dict(analysis.all_points), "split": analysis.split_dict()}
            store.write_intervals(intervals)
            tracking.log_json_artifact(client, context.parent_run_id, INTERVALS, intervals)
        parts = selection.operating_point()
        split = selection.split()
        tracking.set_tags(
            client,
            context.parent_run_id,
            {
                "rpsft.operating_point_trial": selection.best.trial_id,
                "rpsft.operating_point_run": selection.best.run_id,
                "rpsft.item_split": split["text"],
                "rpsft.operating_point_selection_items": parts["selection"].items,
                "rpsft.operating_point_report_items": parts["report"].items,
            },
        )
        n_finished = sum(1 for trial in trials if trial.finished)  # trials, not their trajectories' points
        tracking.log_metrics(client, context.parent_run_id, operating_point_metrics(parts, beta, n_finished))
    if config.keep.any:
        from rpsft.sweeps.retention import keep_checkpoints

        keep_checkpoints(config, client, trials, selection, echo=echo)  # the trials read above
    tracking.finish_run(client, context.parent_run_id, "FINISHED")
    # interrupted (Ctrl-C, a failed trial): the state says so, and `rpsft sweep resume` / `rpsft study` go on
    done = sum(1 for trial in trials if trial.done)
    if done >= expected:
        closed = close_orphaned_optuna_trials(optuna_url, config.name)
        if closed:
            echo(
                f"[rpsft] sweep {config.name}: {closed} Optuna trial(s) asked before a crash and never run: FAIL"
            )
    store.write_state(config, context, "finished" if done >= expected else "incomplete", optuna_url)
    if done < expected:
        for trial in trials:
            if trial.status == "FAILED":
                echo(f"[rpsft] trial {trial.trial_id} FAILED: {trial.failure or 'no reason recorded'}")
        echo(
            f"[rpsft] sweep {config.name}: {done} of {expected} trials done; "
            f"`rpsft sweep resume {config.name}` runs the rest"
        )
    return SweepOutcome(
        config.name,
        store.dir,
        context.tracking_uri,
        context.experiment_id,
        context.parent_run_id,
        trials,
        selection,
    )

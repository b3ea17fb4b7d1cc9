"""One sweep trial, as Ray Tune runs it: train with the trial's knobs, score, log to MLflow, report to Tune.

:func:`run_trial` is the Tune trainable. Everything it needs comes in the :class:`SweepContext` (a plain,
picklable record the driver builds once), so a restored sweep gets an identical trainable back.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore, TrialRecord, trial_label
from rpsft.sweeps.trial.hooks import start_attempt
from rpsft.sweeps.trial.scoring import TrialScorer
from rpsft.sweeps.trial.training import (
    MlflowStepLogger,
    duration,
    log_trained,
    set_torch_threads,
    train_and_score,
)
from transformers import TrainerCallback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_params(params: dict[str, Any], context: SweepContext) -> dict[str, Any]:
    """Trial parameters with ``k: auto`` replaced by the fraction the driver resolved."""
    out = dict(params)
    k = out.get("k")
    if isinstance(k, str):
        if k not in context.auto_k:
            raise ValueError(f"k: {k!r} was not resolved before the trials. Fix: rerun `rpsft sweep`")
        out["k_spec"], out["k"] = k, context.auto_k[k]
    return out


class TuneProgress(TrainerCallback):
    """Each optimizer step, the trial's ``progress`` (step / max_steps) and ``eta`` (the remaining steps at the
    mean step time so far) to Tune, for the driver's table. These interim results carry no objective, so ASHA
    and Optuna ignore them."""

    def __init__(self, report) -> None:
        self.report = report
        self.started: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        self.started, self.first_step = time.monotonic(), state.global_step  # a resumed trial's first step

    def on_step_end(self, args, state, control, **kwargs):
        import time

        done = state.global_step - self.first_step
        per_step = (time.monotonic() - self.started) / max(done, 1)
        left = max(state.max_steps - state.global_step, 0) * per_step
        self.report(
            {
                "progress": f"{state.global_step}/{state.max_steps}",
                "eta": duration(left),
                "step": state.global_step,
            }
        )


class IntermediateEvaluation(TrainerCallback):
    """Every ``every`` optimizer steps: the loss-based trade-off (and the multiple-choice scores when configured)
    with the protected drift (``drift_mean``, when the method has a regularizer), logged and reported to Tune
    (ASHA's rungs); the checkpoint's per-item scores go to ``store(items, step)``
    (:func:`rpsft.sweeps.analysis.trajectory.log_checkpoint_items`)."""

    def __init__(self, scorer: TrialScorer, tokenizer: Any, every: int, report, store=None) -> None:
        self.scorer, self.tokenizer, self.every = scorer, tokenizer, every
        self.report, self.store = report, store
        self.regularizer: Any = None

    def bind_regularizer(self, regularizer: Any) -> None:
        """The run's regularizer (``rpsft.core.train.train`` hands it over; ``None`` for unpenalized methods)."""
        self.regularizer = regularizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            import torch
            from rpsft.core.models import full_precision_forward

            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), full_precision_forward(model):  # as the base model and the final scores
                    metrics, items = self.scorer.checkpoint_scores(model, self.tokenizer)
                    if self.regularizer is not None:
                        drift = list(self.regularizer.drift().values())
                        metrics["drift_mean"] = sum(drift) / len(drift) if drift else 0.0
            finally:
                model.train(was_training)
            if self.store is not None:
                self.store(items, state.global_step)
            self.report(metrics, state.global_step)


def trial_knobs(train_config: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """The knobs the trial's method reads (the method table's ``knobs``), as logged to MLflow: a method never
    logs a k or lambda it does not use; ``k: auto`` logs its spec and, as ``k_resolved``, the fraction."""
    knobs = train_config.knob_values()
    if "k" in knobs and "k_spec" in resolved:
        knobs["k"], knobs["k_resolved"] = resolved["k_spec"], resolved["k"]
    return knobs


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """The Tune trainable: one (method, k, lambda, layers, period) training run, scored and tracked. The
    sweep's ``hooks`` (:mod:`rpsft.sweeps.trial.hooks`) are called before training, as Trainer callbacks during
    it, and after the trial's MLflow writes, before its result goes to Tune."""
    import ray
    from ray import tune

    config = SweepConfig.model_validate(context.config)
    trial_id = tune.get_context().get_trial_id()
    reference = bool(params.get("reference"))
    client = tracking.client_for(context.tracking_uri)
    tags = {tracking.TAG_SWEEP: config.name, tracking.TAG_ROLE: "trial"}
    if reference:
        tags[tracking.TAG_REFERENCE] = str(params["reference"])
    run, _ = tracking.start_child_run(
        client, context.experiment_id, context.parent_run_id, trial_id, trial_label(params), tags
    )
    run_id = run.info.run_id
    objective_key = "reference_objective" if reference else "objective"  # ASHA and Optuna skip references
    scorer = TrialScorer(config, context.base_key, context.cache_dir)

    def report(metrics: dict[str, float], step: int, final: bool = False) -> None:
        scored = {**metrics, **scorer.primary(metrics)}
        if not final:
            tracking.log_metrics(client, run_id, {f"eval/{k}": v for k, v in scored.items()}, step=step)
        out = {k: v for k, v in scored.items() if k != "objective"}
        if "objective" in scored:
            out[objective_key] = scored["objective"]
        shown = {"progress": f"{step}/{config.max_steps or '?'}", "eta": "done" if final else ""}
        tune.report({**out, **shown, "step": step, "final": final})

    if run.info.status == "FINISHED":  # finished before a crash: report its stored results, do not retrain
        tune.report({**_stored_result(TrialRecord.from_run(run)), "final": True})
        return

    try:
        tracking.record_node(client, run, ray.get_runtime_context().get_node_id())  # which node, per attempt
        hooks = start_attempt(config.hooks, config.sweep_dir(), trial_id, trial_label(params))
        hooks.before_training()
        set_torch_threads(config.resources.cpus)
        resolved = resolve_params(params, context)
        trial_dir = SweepStore.of(config).trial_dir(trial_id)
        train_config = config.trial_train_config(resolved, output_dir=trial_dir)
        hook_callbacks = hooks.training_callbacks(distributed=train_config.resources.distributed)
        tracking.log_params(
            client,
            run_id,
            {
                "method": train_config.method,
                **trial_knobs(train_config, resolved),
                "layers": params.get("layers", "all")
                if not isinstance(train_config.layers, str)
                else train_config.layers,
                "seed": train_config.seed,
                "max_steps": train_config.max_steps,
                "optimizer": train_config.optimizer,
                "learning_rate": train_config.learning_rate,
                "reference": params.get("reference"),
                "trial_id": trial_id,
            },
        )
        if train_config.resources.distributed:
            from rpsft.sweeps.trial.distributed import train_and_score_on_workers

            metrics = train_and_score_on_workers(context, train_config, trial_id, run_id)
        else:
            metrics = _train_and_score(
                config, context, train_config, scorer, client, run_id, report, extra_callbacks=hook_callbacks
            )
        result = {**metrics, **scorer.primary(metrics)}
        # with epochs, the steps trained
        final_step = int(result.get("global_steps") or train_config.max_steps or 0)
        tracking.log_metrics(client, run_id, result, step=final_step)
        tracking.log_json_artifact(
            client, run_id, "trial_config.json", train_config.model_dump(mode="json", by_alias=True)
        )
        tracking.log_json_artifact(client, run_id, "result.json", result)
        tracking.finish_run(client, run_id, "FINISHED", state="finished")
        hooks.at_trial_end()
    except SystemExit:  # Tune stops a trial (ASHA) by raising SystemExit in its report()
        tracking.finish_run(client, run_id, "KILLED", state="early-stopped")
        raise
    except BaseException as exc:
        tracking.record_failure(client, run_id, exc)
        tracking.finish_run(client, run_id, "FAILED", state="failed")
        raise
    report(metrics, final_step, final=True)


def _train_and_score(
    config, context, train_config, scorer, client, run_id, report, extra_callbacks=()
) -> dict[str, float]:
    """:func:`train_and_score` inside a Tune trial: per-step MLflow logging, the driver's progress table,
    intermediate evaluations; the item scores, rotation and training record go to the trial's run."""
    from ray import tune

    step_logger = MlflowStepLogger(client, run_id)
    callbacks = [
        step_logger,
        TuneProgress(lambda values: tune.report({**values, "final": False})),
        *extra_callbacks,
    ]
    if config.evaluation.every:
        from rpsft.core.models import load_tokenizer

        tokenizer = load_tokenizer(train_config.model, train_config.cache_dir)
        from rpsft.sweeps.analysis.trajectory import log_checkpoint_items

        def store(items: dict[str, Any], step: int) -> None:
            log_checkpoint_items(client, run_id, step, items)

        keep_items = store if config.evaluation.trajectory else None  # item scores only for trajectory points
        callbacks.append(
            IntermediateEvaluation(scorer, tokenizer, config.evaluation.every, report, keep_items)
        )
    try:
        result, metrics, items = train_and_score(config, context, train_config, scorer, callbacks)
    except BaseException:
        with contextlib.suppress(Exception):  # the steps before a failure stay on record; its cause is raised
            step_logger.flush()
        raise
    metrics.update(log_trained(config, client, run_id, result.model, items, result.metrics))
    return metrics


def _stored_result(trial: TrialRecord) -> dict[str, float]:
    metrics = dict(trial.metrics)
    if "objective" in metrics and trial.reference:
        metrics["reference_objective"] = metrics.pop("objective")
    metrics.setdefault("step", int(trial.params.get("max_steps", 0) or 0))
    return metrics

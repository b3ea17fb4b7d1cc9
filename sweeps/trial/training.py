"""One trial's training and scoring in this process, and its records on the trial's MLflow run.

:func:`train_and_score` trains a trial's :class:`TrainConfig` and scores it; nothing is logged there, so a Tune
trial (:mod:`rpsft.sweeps.trial.run`), a Ray Train worker of a trial over several workers
(:mod:`rpsft.sweeps.trial.distributed`) and a retrained trial (``rpsft export``) run the very same code.
:class:`MlflowStepLogger` queues the per-step numbers on the run and :func:`log_trained` writes the trained
trial's item scores, rotation and training record.
"""

from __future__ import annotations

from typing import Any

from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import ITEM_SCORES, SweepContext, SweepStore
from rpsft.sweeps.trial.scoring import TrialScorer
from transformers import TrainerCallback

PER_STEP_KEYS = ("loss", "grad_norm", "learning_rate", "rpsft/penalty", "rpsft/drift_mean", "rpsft/drift_max")


class MlflowStepLogger(TrainerCallback):
    """Per-step task loss, penalty and protected drift into the trial's MLflow run. The writes are queued
    (MLflow's asynchronous logging), so training does not wait on the tracking server, nor stop while it is
    down; the end of training waits until every queued write has landed."""

    def __init__(self, client: Any, run_id: str, keys: dict[str, str] | None = None) -> None:
        self.client, self.run_id = client, run_id
        self.keys = keys or {key: key for key in PER_STEP_KEYS}  # the Trainer's log key -> the metric's name
        self.pending: list[Any] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.log(logs, state.global_step)

    def log(self, logs: dict[str, Any], step: int) -> None:
        """Queue the per-step keys of ``logs`` (the Trainer's names) for the run, at ``step``."""
        values = {name: logs[key] for key, name in self.keys.items() if logs.get(key) is not None}
        if values:
            self.pending += tracking.log_metrics(
                self.client, self.run_id, values, step=step, synchronous=False
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for operation in pending:
            operation.wait()


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def set_torch_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def train_and_score(
    config: SweepConfig, context: SweepContext, train_config: Any, scorer: TrialScorer, callbacks=()
) -> tuple[Any, dict[str, float], dict[str, Any]]:
    """Train one trial and score it: ``(train result, metrics, per-item scores)``. Nothing is logged here, so
    a trial retrained outside the sweep (``rpsft export``) runs the very same code."""
    import torch
    from rpsft.core.bases import load_or_compute_bases
    from rpsft.core.models import load_model, load_tokenizer
    from rpsft.core.selection import select_matrices
    from rpsft.core.train import train

    tokenizer = load_tokenizer(train_config.model, train_config.cache_dir)
    model, _ = load_model(train_config.model, dtype=train_config.dtype, cache_dir=train_config.cache_dir)
    bases = None
    if train_config.effective_k:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        selection = select_matrices(model, train_config.layers)
        bases = load_or_compute_bases(
            selection, train_config.effective_k, cache_dir=context.bases_dir, method=train_config.basis_method
        )
    result = train(
        train_config,
        model=model,
        tokenizer=tokenizer,
        bases=bases,
        callbacks=list(callbacks),
        progress=False,
        print_logs=False,
    )
    metrics, items = score_trained(config, train_config, scorer, result.model.eval(), tokenizer)
    metrics.update(training_summary(result.metrics, result.drift))
    return result, metrics, items


def score_trained(
    config: SweepConfig, train_config: Any, scorer: TrialScorer, trained: Any, tokenizer: Any
) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, per-item scores)`` of a trained model, with the base model beside it when the KL is scored."""
    import torch
    from rpsft.core.models import load_model

    base_model = None
    if config.evaluation.loss.kl:
        base_model, _ = load_model(
            train_config.model, dtype=train_config.dtype, cache_dir=train_config.cache_dir
        )
        base_model.to(next(trained.parameters()).device).eval()
    with torch.no_grad():
        metrics, items, _ = scorer.final_scores(trained, tokenizer, base_model=base_model)
    return metrics, items


def training_summary(train_metrics: dict[str, Any], drift: dict[str, float]) -> dict[str, float]:
    """The training numbers a trial's result carries: loss, time, the resumed step, and the protected drift."""
    return {
        "train_loss": train_metrics["train_loss"],
        "train_seconds": train_metrics["train_seconds"],
        "resumed_from_step": train_metrics["resumed_from_step"],
        "global_steps": train_metrics["global_steps"],
        "drift_mean": sum(drift.values()) / len(drift) if drift else 0.0,
        "drift_max": max(drift.values()) if drift else 0.0,
    }


def log_trained(
    config: SweepConfig,
    client: Any,
    run_id: str,
    trained: Any,
    items: dict[str, Any],
    train_metrics: dict[str, Any],
) -> dict[str, float]:
    """The trained trial's records on its run: item scores, rotation against the base subspaces (its numbers
    returned) and the training record."""
    tracking.log_json_artifact(client, run_id, ITEM_SCORES, items)
    rotation = _log_rotation(config, trained, client, run_id) if config.evaluation.rotation else {}
    tracking.log_json_artifact(
        client, run_id, "train_metrics.json", {k: v for k, v in train_metrics.items() if k != "config"}
    )
    return rotation


def _log_rotation(config: SweepConfig, trained: Any, client: Any, run_id: str) -> dict[str, float]:
    """Rotation of the trained model against the base subspaces the driver cached; the summary as an artifact,
    the flat ``rotation/*`` numbers returned for the run's metrics."""
    import torch
    from rpsft.evaluation.diagnostics.rotation import rotation_metrics, rotation_summary

    base_subspaces = torch.load(SweepStore.of(config).rotation_base, map_location="cpu")
    with torch.no_grad():
        summary = rotation_summary(
            None,
            trained,
            list(base_subspaces),
            top_k=config.evaluation.rotation_top_k,
            base_subspaces={name: u.double() for name, u in base_subspaces.items()},
        )
    tracking.log_json_artifact(client, run_id, "rotation.json", summary)
    return rotation_metrics(summary)

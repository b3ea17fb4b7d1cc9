"""A trial over several workers: a Ray Train ``TorchTrainer`` inside the Tune trial (``resources.workers > 1``).

The Tune trial (:func:`rpsft.sweeps.trial.run.run_trial`) starts ``resources.workers`` Ray Train workers joined in one
process group (gloo on CPUs, NCCL on GPUs). Each runs :func:`rpsft.core.sharded_train.train_on_rank`: FSDP2 or
DDP, the data sharded across the workers, the penalty on each worker's rows, checkpoints through
``torch.distributed.checkpoint`` in the trial's directory (a retried trial resumes from them).

Before training, rank 0 tags the trial's run with every rank's Ray node (``rpsft.worker_nodes``; the run's
``rpsft.nodes`` is the node of the Tune trial that drives them). After every optimizer step all workers report
to Ray Train, and :class:`TuneReportCallback` hands rank 0's
progress on to the Tune trial (the driver's table); rank 0 also logs the step to the trial's MLflow run. After
training, rank 0 loads the consolidated checkpoint, scores it exactly as a one-process trial is scored, and
logs the item scores; its numbers come back in the checkpoint of its last report, and the Tune trial
records and reports them as any trial does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore

SCORES_FILE = "scores.json"  # rank 0's scores, in the checkpoint of its last report


def scaling_config(resources: Any) -> Any:
    """Ray Train's :class:`ScalingConfig` for :class:`rpsft.core.config.Resources`."""
    from ray.train import ScalingConfig

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker)


def train_and_score_on_workers(
    context: SweepContext, train_config: Any, trial_id: str, run_id: str
) -> dict[str, float]:
    """Train ``train_config`` on its workers and score it; returns the trial's metrics (as
    :func:`rpsft.sweeps.trial.training.train_and_score` does for one process)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from rpsft.sweeps.config.sweep import SweepConfig

    config = SweepConfig.model_validate(context.config)
    resources = train_config.resources
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "context": context,
            "train_config": train_config.model_dump(mode="json", by_alias=True),
            "run_id": run_id,
        },
        scaling_config=scaling_config(resources),
        torch_config=TorchConfig(backend="nccl" if resources.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=str(SweepStore.of(config).ray_train_dir),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: the workers finished without scores (rank 0 reported none)")
    with result.checkpoint.as_directory() as record_dir:
        return json.loads((Path(record_dir) / SCORES_FILE).read_text())


def worker_nodes() -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all workers call it)."""
    import ray
    import torch.distributed as dist

    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return [str(node) for node in nodes]


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: train on this rank; rank 0 then scores, logs and reports the result."""
    import ray.train
    from rpsft.core.config import TrainConfig
    from rpsft.core.sharded_train import train_on_rank
    from rpsft.sweeps.config.sweep import SweepConfig
    from rpsft.sweeps.trial.scoring import TrialScorer
    from rpsft.sweeps.trial.training import (
        MlflowStepLogger,
        duration,
        log_trained,
        score_trained,
        set_torch_threads,
        training_summary,
    )

    context: SweepContext = loop_config["context"]
    config = SweepConfig.model_validate(context.config)
    train_config = TrainConfig.model_validate(loop_config["train_config"])
    rank = ray.train.get_context().get_world_rank()
    set_torch_threads(train_config.resources.cpus)
    client = tracking.client_for(context.tracking_uri) if rank == 0 else None
    step_logger = MlflowStepLogger(client, loop_config["run_id"]) if rank == 0 else None
    started = time.monotonic()

    def on_step(record: dict[str, Any]) -> None:
        step, max_steps = int(record["step"]), int(record["max_steps"])
        if step_logger is not None:
            step_logger.log(record, step)
        per_step = (time.monotonic() - started) / max(step, 1)
        progress = {"progress": f"{step}/{max_steps}", "eta": duration((max_steps - step) * per_step)}
        ray.train.report({**progress, "step": step, "final": False})

    nodes = worker_nodes()  # before training, so a lost or failed attempt has them too
    if rank == 0:
        client.set_tag(loop_config["run_id"], tracking.TAG_WORKER_NODES, ",".join(nodes))
    # rank 0 scores the consolidated checkpoint; it stays only for a trial whose weights may be kept
    train_config = train_config.model_copy(update={"save_model": True})
    result = train_on_rank(
        train_config, bases_dir=context.bases_dir, on_step=on_step, on_step_every_rank=True
    )
    metrics: dict[str, Any] = {}
    if rank == 0:
        from rpsft.core.models import load_model, load_tokenizer

        step_logger.flush()
        tokenizer = load_tokenizer(train_config.model, train_config.cache_dir)
        trained, _ = load_model(str(result.model_dir), dtype=train_config.dtype)
        device = ray.train.torch.get_device()
        trained.to(device).eval()
        scorer = TrialScorer(config, context.base_key, context.cache_dir)
        metrics, items = score_trained(config, train_config, scorer, trained, tokenizer)
        metrics.update(training_summary(result.metrics, result.drift))
        metrics.update(log_trained(config, client, loop_config["run_id"], trained, items, result.metrics))
        del trained
        if not config.keep.any:
            shutil.rmtree(result.model_dir, ignore_errors=True)
    steps = int(result.metrics.get("global_steps", 0))
    shown = {"progress": f"{steps}/{steps}", "eta": "scored", "step": steps, "final": False}
    if rank != 0:
        ray.train.report(shown)
        return
    # the scores travel in the checkpoint of rank 0's last report (Tune sees only the progress)
    with tempfile.TemporaryDirectory() as record_dir:
        (Path(record_dir) / SCORES_FILE).write_text(json.dumps(metrics))
        ray.train.report(shown, checkpoint=ray.train.Checkpoint.from_directory(record_dir))

"""One training run from a :class:`TrainConfig`, executed on every rank of an initialized process group.

:func:`train_on_rank` is what each worker of a sharded trial runs (Ray Train initializes the process group:
gloo on CPU, NCCL on GPU; :func:`rpsft.core.distributed.spawn_local` does the same on one machine). A process
group of one rank works too.

* Data: the examples of ``config.data`` in one deterministic stream over the epochs
  (:mod:`rpsft.core.sharded_data`): every optimizer step sees ``batch_size * world_size * grad_accum``
  examples (``batch_size`` is per device, as with the HF Trainer) in ``grad_accum`` micro-batches, of which
  each rank takes its rows.
* Loss: the mean token loss over every scored token of the step (all micro-batches, all ranks), so any world
  size and any split into micro-batches give the same update (:func:`rpsft.core.fsdp.train_steps`).
* ``resources.strategy: fsdp2`` shards the model with :func:`rpsft.core.fsdp.shard_model`; ``ddp`` replicates
  it under ``DistributedDataParallel``. The method's checks, bases and penalty are
  :mod:`rpsft.core.sharded_method`; which methods train sharded is the ``sharded`` field of
  :data:`rpsft.core.method_table.METHODS` (``osf`` and ``iw`` raise a :class:`ConfigError`).
* ``lora`` and ``rpsft-lora``: the PEFT LoRA model of the single-process path
  (:func:`rpsft.core.methods.add_adapters`) is built before sharding (FSDP2 shards the adapters with their
  blocks) and only the adapters train.
* Checkpoints: every ``checkpoint_every`` steps under ``<output_dir>/dcp/step-<N>``; a rerun resumes from the
  latest complete one (:mod:`rpsft.core.sharded_checkpoint`).
* At the end: rank 0 writes ``<output_dir>/metrics.json`` and, with ``save_model``, a consolidated HF
  checkpoint ``<output_dir>/model`` (:mod:`rpsft.core.sharded_export`).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rpsft.core.config import TrainConfig
from rpsft.core.distributed import all_reduce_max, barrier, from_rank0, rank_device, spawn_local, world
from rpsft.core.errors import ConfigError
from rpsft.core.fsdp import adamw, checkpoint_blocks, shard_model, train_steps
from rpsft.core.method_table import MethodSpec
from rpsft.core.precision import resolve_mixed_precision
from rpsft.core.sharded_checkpoint import (
    TrainState,
    latest_complete_checkpoint,
    load_checkpoint,
    resumed_batch_mismatch,
    save_checkpoint,
)
from rpsft.core.sharded_data import ExampleStream, rank_step_batches
from rpsft.core.sharded_export import save_consolidated
from rpsft.core.sharded_method import (
    check_sharded_config,
    check_sharded_settings,
    make_penalty,
    penalty_bytes,
    prepare_bases_source,
)
from torch import nn


@dataclass
class ShardedTrainResult:
    """What :func:`train_on_rank` returns on every rank. ``metrics`` are the ones rank 0 writes to
    ``metrics.json``; ``drift`` is measured from the reduced protected blocks at the end (the same on every
    rank); ``model`` is the trained model: sharded in place under FSDP2 (:func:`rpsft.core.fsdp.full_state`
    gathers it, collectively), the module inside the wrapper under DDP; the PEFT model for ``lora`` and
    ``rpsft-lora``."""

    metrics: dict[str, Any]
    drift: dict[str, float]
    output_dir: Path
    rank: int
    world_size: int
    model_dir: Path | None
    model: nn.Module | None = field(default=None, repr=False)


@dataclass
class _RankModel:
    """One rank's model, ready to train: ``wrapped`` (FSDP2-sharded in place, or under DDP) around ``inner``
    (the model itself; the PEFT model for LoRA), the protected matrices ``names``, the ``k`` that ``k: auto``
    resolved to (None without it), the penalty (None for an unpenalized method), the seconds spent on bases
    and the model's ``use_cache`` before activation checkpointing switched it off."""

    wrapped: nn.Module
    inner: nn.Module
    names: list[str]
    k_resolved: int | float | None
    penalty: Any
    bases_seconds: float
    use_cache: bool | None


def _wrap(model: nn.Module, config: TrainConfig, device: torch.device, world_size: int) -> nn.Module:
    """The module to train: the FSDP2-sharded model (in place), or the model under DDP."""
    if config.resources.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        return shard_model(
            model,
            init_device_mesh(device.type, (world_size,)),
            mixed_precision="bf16"
            if resolve_mixed_precision(config.mixed_precision, device) == "bf16"
            else None,
            activation_checkpointing=config.activation_checkpointing,
        )
    from torch.nn.parallel import DistributedDataParallel

    if config.activation_checkpointing:
        checkpoint_blocks(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _resolve_auto_k(config: TrainConfig, model: nn.Module, tokenizer: Any) -> int | float | None:
    if not config.auto_k:
        return None
    from rpsft.core.rank_rule import resolve_k_from_prompts

    return from_rank0(
        lambda: resolve_k_from_prompts(model, tokenizer, config.effective_k, config.auto_k_prompts), "k: auto"
    )


def _drift_summary(drift: dict[str, float]) -> dict[str, float]:
    values = list(drift.values())
    return {"rpsft/drift_mean": sum(values) / len(values), "rpsft/drift_max": max(values)} if values else {}


def _load_inputs(
    config: TrainConfig, tokenizer: Any, model: nn.Module | None, device: torch.device
) -> tuple[Any, Any, nn.Module]:
    """``(tokenizer, dataset, model)``: the given tokenizer and model or the ones of ``config.model``, the SFT
    dataset of ``config.data``, and the model moved to ``device``."""
    from rpsft.core.data import build_sft_dataset, load_examples
    from rpsft.core.models import load_model, load_tokenizer, resolve_model_dir

    source_dir = config.model
    if model is None or tokenizer is None:  # rank 0 fills the model cache (an embedded model, a GGUF) once
        source_dir = from_rank0(lambda: resolve_model_dir(config.model, config.cache_dir), "model")
    if tokenizer is None:
        tokenizer = load_tokenizer(source_dir, config.cache_dir)
    examples = load_examples(config.data, limit=config.data_limit, seed=config.seed)
    dataset = build_sft_dataset(examples, tokenizer, config.max_length)
    if model is None:
        model, _ = load_model(source_dir, dtype=config.dtype, cache_dir=config.cache_dir)
    model.to(device)
    return tokenizer, dataset, model


def _prepare_rank_model(
    spec: MethodSpec,
    config: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    device: torch.device,
    *,
    bases_file: str | os.PathLike | None,
    bases_dir: str | os.PathLike | None,
) -> _RankModel:
    """The selected matrices, ``k`` (``k: auto`` resolved on rank 0), the adapters of a LoRA method, this
    rank's bases, the wrapped model and its penalty."""
    from rpsft.core.selection import select_matrices
    from transformers import set_seed

    rank, world_size = world()
    selection = select_matrices(model, config.layers)
    names = list(selection)
    k_resolved = _resolve_auto_k(config, model, tokenizer)
    k = config.effective_k if k_resolved is None else k_resolved
    if spec.adapter is not None:
        from rpsft.core.methods import add_adapters

        set_seed(config.seed)  # every rank draws the same initial adapters
        model = add_adapters(model, config, selection)
    started = time.perf_counter()
    source = prepare_bases_source(
        spec, config, selection, k, bases_file=bases_file, device=device, bases_dir=bases_dir
    )
    bases_seconds = time.perf_counter() - started
    del selection  # the parameters are replaced by their shards
    # activation checkpointing turns the KV cache off for training; the trained model gets it back
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    wrapped = _wrap(model, config, device, world_size)
    started = time.perf_counter()
    penalty = make_penalty(
        spec, config, model, names, source, k=k, world_size=world_size, rank=rank, device=device
    )
    bases_seconds += time.perf_counter() - started
    # FSDP2 shards ``model`` in place; DDP keeps it as .module: either way it is the module inside
    return _RankModel(wrapped, model, names, k_resolved, penalty, bases_seconds, use_cache)


def _optimization(
    config: TrainConfig, inner: nn.Module, device: torch.device, n_examples: int, world_size: int
) -> tuple[torch.optim.Optimizer, Any, int, int]:
    """``(optimizer, scheduler, max_steps, global_batch)``: AdamW over ``inner`` and the schedule of
    ``max_steps`` (from ``epochs`` over ``n_examples`` unless ``max_steps`` is set)."""
    from transformers import get_scheduler

    fused = config.optimizer == "adamw_torch_fused" and device.type == "cuda"
    optimizer = adamw(inner, config.learning_rate, config.weight_decay, fused=fused)
    global_batch = config.batch_size * world_size * config.grad_accum
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * n_examples / global_batch))
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(max_steps * config.warmup_ratio),
        num_training_steps=max_steps,
    )
    return optimizer, scheduler, max_steps, global_batch


def _resume(state: TrainState, config: TrainConfig, out_dir: Path, global_batch: int) -> int:
    """Load the latest complete checkpoint of ``out_dir`` into ``state`` (with ``checkpoint_every``); returns
    the step it resumes from, 0 when it starts afresh."""
    if not config.checkpoint_every:
        return 0
    found = from_rank0(lambda: latest_complete_checkpoint(out_dir), "checkpoint")
    if found is None:
        return 0
    resume_from = Path(found)
    if world()[0] == 0 and (mismatch := resumed_batch_mismatch(resume_from, global_batch)) is not None:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=3)  # rank 0 alone reads the marker and warns
    load_checkpoint(state, resume_from)
    return int(state.progress["step"])


def _step_recorder(
    config: TrainConfig,
    state: TrainState,
    penalty: Any,
    *,
    out_dir: Path,
    n_examples: int,
    global_batch: int,
    max_steps: int,
    on_step: Callable[[dict[str, Any]], None] | None,
    on_step_every_rank: bool,
) -> Callable[[dict[str, Any]], None]:
    """What runs after each optimizer step: the progress and log history updated, a checkpoint every
    ``checkpoint_every`` steps, then ``on_step`` (rank 0, or every rank with ``on_step_every_rank``)."""
    progress = state.progress
    rank = world()[0]

    def after_step(record: dict[str, Any]) -> None:
        step = record["step"]
        progress["step"] = step
        progress["examples_seen"] += global_batch
        progress["loss_sum"] += record["loss"]
        entry = {
            "loss": record["loss"],
            "grad_norm": record["grad_norm"],
            "learning_rate": record["learning_rate"],
            "epoch": progress["examples_seen"] / n_examples,
            "step": step,
        }
        logged = step % config.logging_steps == 0 or step == max_steps
        if penalty is not None and record["penalty"] is not None:
            drift = penalty.last_drift()
            entry.update({"rpsft/penalty": record["penalty"], **_drift_summary(drift)})
            if logged:
                progress["drift_history"].append({"step": step, "penalty": record["penalty"], "drift": drift})
        if logged:
            progress["log_history"].append(entry)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(state, out_dir, step)
        if on_step is not None and (rank == 0 or on_step_every_rank):
            on_step({**entry, "max_steps": max_steps})

    return after_step


def _run_metrics(
    config: TrainConfig,
    ready: _RankModel,
    progress: dict[str, Any],
    drift: dict[str, float],
    dataset: Any,
    *,
    train_seconds: float,
    resumed_from_step: int,
    world_size: int,
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the config, the losses and drift, the timings and the run's shape."""
    steps_done = int(progress["step"])
    return {
        "config": config.model_dump(mode="json", by_alias=True),
        "k_resolved": ready.k_resolved,
        "train_loss": progress["loss_sum"] / steps_done if steps_done else 0.0,
        "global_steps": steps_done,
        "train_seconds": train_seconds,
        "resumed_from_step": resumed_from_step,
        "bases_seconds": ready.bases_seconds,
        "n_examples": len(dataset),
        "n_dropped_examples": dataset.n_dropped,
        "n_matrices": len(ready.names),
        "bases_bytes": penalty_bytes(ready.penalty),
        "log_history": progress["log_history"],
        "drift": drift,
        "drift_history": progress["drift_history"],
        "drift_mean": sum(drift.values()) / len(drift) if drift else 0.0,
        "workers": world_size,
        "strategy": config.resources.strategy,
    }


def _train(
    ready: _RankModel,
    spec: MethodSpec,
    config: TrainConfig,
    state: TrainState,
    dataset: Any,
    tokenizer: Any,
    max_steps: int,
    after_step: Callable[[dict[str, Any]], None],
    device: torch.device,
) -> float:
    """The optimizer steps from the state's step to ``max_steps``, on this rank's rows of the example stream;
    returns the seconds of the slowest rank."""
    from rpsft.core.data import SFTCollator

    rank, world_size = world()
    progress = state.progress
    precision = resolve_mixed_precision(config.mixed_precision, device)
    start_step = int(progress["step"])
    batches = rank_step_batches(
        dataset,
        ExampleStream(len(dataset), config.seed),
        start_position=int(progress["examples_seen"]),
        steps=max(0, max_steps - start_step),
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        world_size=world_size,
        rank=rank,
        pad_token_id=SFTCollator(tokenizer.pad_token_id).pad_token_id,
    )
    started = time.perf_counter()
    train_steps(
        ready.wrapped,
        batches,
        state.optimizer,
        penalty=ready.penalty,
        max_grad_norm=config.max_grad_norm,
        scheduler=state.scheduler,
        loss_type=spec.loss,
        start_step=start_step,
        local=True,
        autocast_dtype=torch.bfloat16 if config.resources.strategy == "ddp" and precision == "bf16" else None,
        after_step=after_step,
    )
    return all_reduce_max(time.perf_counter() - started, device)


def train_on_rank(
    config: TrainConfig,
    *,
    bases_file: str | os.PathLike | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    tokenizer: Any = None,
    model: nn.Module | None = None,
    bases_dir: str | os.PathLike | None = None,
    on_step_every_rank: bool = False,
) -> ShardedTrainResult:
    """Train ``config`` on this rank; call it on every rank of the process group (of ``resources.workers``
    ranks). ``bases_file``: a bases file of :func:`rpsft.core.bases.save_bases` (a sweep's shared one; each rank
    reads its slices; without it rank 0 computes the bases, or reuses the cached file in ``bases_dir``, default
    the config's cache, that covers k). ``on_step(record)`` runs on rank 0 after each optimizer step (and after
    that step's checkpoint) with ``step``, ``max_steps``, ``epoch``, ``loss``, ``learning_rate``,
    ``grad_norm`` and, on the steps the penalty applies, ``rpsft/penalty``, ``rpsft/drift_mean`` and
    ``rpsft/drift_max``; with ``on_step_every_rank`` every rank calls it with the same (global) record, as
    Ray Train's ``report``, a barrier over the workers, needs. ``tokenizer`` / ``model``: loaded ones to use
    instead of loading ``config.model`` (the model is moved to this rank's device and trained in place; for
    ``lora`` and ``rpsft-lora`` its selected modules are wrapped in LoRA adapters in place)."""
    spec = check_sharded_config(config)
    from transformers import set_seed

    rank, world_size = world()
    device = rank_device()
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)

    tokenizer, dataset, model = _load_inputs(config, tokenizer, model, device)
    ready = _prepare_rank_model(
        spec, config, model, tokenizer, device, bases_file=bases_file, bases_dir=bases_dir
    )
    optimizer, scheduler, max_steps, global_batch = _optimization(
        config, ready.inner, device, len(dataset), world_size
    )
    state = TrainState(ready.wrapped, optimizer, scheduler)
    resumed_from_step = _resume(state, config, out_dir, global_batch)
    progress = state.progress
    after_step = _step_recorder(
        config,
        state,
        ready.penalty,
        out_dir=out_dir,
        n_examples=len(dataset),
        global_batch=global_batch,
        max_steps=max_steps,
        on_step=on_step,
        on_step_every_rank=on_step_every_rank,
    )
    train_seconds = _train(ready, spec, config, state, dataset, tokenizer, max_steps, after_step, device)
    if ready.use_cache is not None:
        ready.inner.config.use_cache = ready.use_cache

    drift = ready.penalty.drift() if ready.penalty is not None else {}
    model_dir = None
    if config.save_model:
        save_consolidated(ready.wrapped, ready.inner, tokenizer, out_dir / "model")
        model_dir = out_dir / "model"
    metrics = _run_metrics(
        config,
        ready,
        progress,
        drift,
        dataset,
        train_seconds=train_seconds,
        resumed_from_step=resumed_from_step,
        world_size=world_size,
    )
    if rank == 0:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    barrier()
    return ShardedTrainResult(metrics, drift, out_dir, rank, world_size, model_dir, ready.inner)


# ------------------------------------------------------------------------------------------ one machine


@dataclass
class LocalWorkersResult:
    """What ``rpsft train --workers N`` gets back from its ranks: rank 0's metrics and where it wrote."""

    metrics: dict[str, Any]
    output_dir: Path
    model_dir: Path | None


def _train_local_rank(rank: int, world_size: int, config_json: str, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["LOCAL_RANK"] = str(rank)
    train_on_rank(TrainConfig.model_validate_json(config_json))


def train_local_workers(config: TrainConfig) -> LocalWorkersResult:
    """Train ``config`` on ``resources.workers`` processes of this machine, one process group (gloo on CPU,
    NCCL with one GPU per worker when CUDA is available): what ``rpsft train --workers N`` runs. Sweeps start
    their workers through Ray Train instead (``rpsft.sweeps.trial.distributed``)."""
    check_sharded_settings(config)
    workers = config.resources.workers
    backend = "gloo"
    if torch.cuda.is_available():
        if torch.cuda.device_count() < workers:
            raise ConfigError(
                f"resources.workers: {workers} on a machine with {torch.cuda.device_count()} GPU(s). "
                f"Fix: workers <= {torch.cuda.device_count()}"
            )
        backend = "nccl"
    threads = max(1, int(config.resources.cpus))
    spawn_local(_train_local_rank, workers, config.model_dump_json(by_alias=True), threads, backend=backend)
    out_dir = Path(config.output_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    model_dir = out_dir / "model"
    return LocalWorkersResult(metrics, out_dir, model_dir if (model_dir / "config.json").is_file() else None)

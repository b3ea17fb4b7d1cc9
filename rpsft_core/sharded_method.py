"""What a training method needs to train over several workers: the checks of its config, where each rank's
bases come from, and its penalty.

Whether a method trains sharded is its ``sharded`` field in :data:`rpsft.core.method_table.METHODS`.
``resources.strategy: fsdp2`` applies :class:`rpsft.core.sharded_penalty.ShardedRPSFTPenalty` (and, for
``rpsft-lora``, :class:`rpsft.core.sharded_lora_penalty.ShardedLoRAPenalty`) on row slices of the bases file, so
no rank holds a full ``Uk``; ``ddp`` applies :class:`rpsft.core.regularizer.RPSFTRegularizer` on full bases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rpsft.core.bases import (
    Bases,
    ensure_bases_file,
    full_rank_everywhere,
    load_bases,
    load_or_compute_bases,
)
from rpsft.core.config import TrainConfig
from rpsft.core.distributed import from_rank0
from rpsft.core.errors import ConfigError
from rpsft.core.fsdp import parameter_names
from rpsft.core.method_table import METHODS, MethodSpec
from rpsft.core.row_shards import RowShardBasis, load_row_shard, local_tensor, lora_full_slice, row_range
from rpsft.core.sharded_lora_penalty import ShardedLoRAPenalty, find_sharded_lora_parts
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty
from torch import nn


def check_sharded_method(config: TrainConfig) -> MethodSpec:
    """The spec of ``config.method`` when it trains over several workers (its ``sharded`` field in
    :data:`rpsft.core.method_table.METHODS`), else a :class:`ConfigError` that says why and names the fix."""
    spec = config.spec
    if not spec.sharded:
        if spec.reference_model:
            why = "it keeps a frozen reference model"
        elif spec.adapter:
            why = f"it trains {spec.trains}"
        else:
            why = "it has no sharded implementation"
        runs = ", ".join(name for name, method in METHODS.items() if method.sharded)
        raise ConfigError(
            f"method: {config.method!r} with resources.workers: {config.resources.workers} "
            f"(strategy {config.resources.strategy}); {why}, and sharded training runs only "
            f"{runs}. Fix: resources.workers: 1, which trains it in one process "
            "(rpsft.core.train.train), or one of those methods"
        )
    return spec


def check_sharded_settings(config: TrainConfig) -> MethodSpec:
    """The checks of the config alone (before any process starts): the method, the optimizer, mixed precision,
    the scheduler and ``stop_at_step`` under sharded training; returns the method's spec."""
    spec = check_sharded_method(config)
    workers = config.resources.workers
    if config.optimizer not in ("adamw_torch", "adamw_torch_fused"):
        raise ConfigError(
            f"optimizer: {config.optimizer} under sharded training (resources.workers: {workers}). "
            "Fix: adamw_torch or adamw_torch_fused"
        )
    if config.mixed_precision == "fp16":
        raise ConfigError(
            f"mixed_precision: fp16 under sharded training (resources.workers: {workers}); fp16 needs a loss "
            "scaler. Fix: bf16 or no"
        )
    if config.lr_scheduler == "reduce_lr_on_plateau":
        raise ConfigError(
            "lr_scheduler: reduce_lr_on_plateau steps on evaluation metrics, which sharded training does not "
            "compute. Fix: cosine, linear or constant"
        )
    if config.stop_at_step is not None:
        raise ConfigError(
            f"stop_at_step: {config.stop_at_step} under sharded training (resources.workers: {workers}); only "
            "one-process training stops early on the full run's schedule. Fix: resources.workers: 1, or no "
            "stop_at_step"
        )
    return spec


def check_sharded_config(config: TrainConfig) -> MethodSpec:
    """The cheap checks, before any data or model is loaded: :func:`check_sharded_settings`, and the process
    group against ``resources.workers``."""
    import torch.distributed as dist

    spec = check_sharded_settings(config)
    workers = config.resources.workers
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed: no process group is initialized. Fix: call train_on_rank on every worker of a "
            "process group (Ray Train, torchrun, or rpsft.core.distributed.spawn_local)"
        )
    world_size = dist.get_world_size()
    if world_size != workers:
        raise ConfigError(
            f"resources.workers: {workers}, but this process group has {world_size} rank(s). "
            f"Fix: resources.workers: {world_size}, or start {workers} workers"
        )
    return spec


# ------------------------------------------------------------------------------------------ bases and penalty


@dataclass
class BasesSource:
    """Where each rank's bases come from: a bases file (``path``), the rank's own pretrained weights
    (``from_weights``: full rank, each rank's rows of ``W0``), or bases already in memory (``bases``, DDP)."""

    path: Path | None = None
    from_weights: bool = False
    bases: Bases | None = None


def prepare_bases_source(
    spec: MethodSpec,
    config: TrainConfig,
    selection: dict[str, nn.Parameter],
    k: int | float,
    *,
    bases_file: str | os.PathLike | None,
    device: torch.device,
    bases_dir: str | os.PathLike | None = None,
) -> BasesSource | None:
    """Before the model is sharded: where this rank's bases come from. Without ``bases_file``, rank 0
    computes (or reuses) the cached bases file in ``bases_dir`` (default: the config's cache,
    :func:`rpsft.core.methods.bases_cache_dir`) and every rank waits for it; a full-rank penalty needs no file
    under FSDP2 (each rank keeps its rows of the pretrained weights)."""
    from rpsft.core.methods import bases_cache_dir

    if not spec.uses_bases:
        return None
    cache_dir = Path(bases_dir) if bases_dir is not None else bases_cache_dir(config)
    strategy = config.resources.strategy
    if bases_file is not None:
        path = Path(bases_file)
        if strategy == "fsdp2":
            return BasesSource(path=path)
        return BasesSource(bases=load_bases(path)[0].truncate(k).to(device))
    if full_rank_everywhere(selection, k):
        if strategy == "fsdp2":
            return BasesSource(from_weights=True)
        return BasesSource(
            bases=load_or_compute_bases(selection, k, cache_dir=cache_dir, method=config.basis_method)
        )

    def find_or_compute() -> str:
        # the sweep's shared file when it covers k (found without loading its tensors), else computed once
        return str(ensure_bases_file(selection, k, cache_dir=cache_dir, method=config.basis_method))

    path = Path(from_rank0(find_or_compute, "bases"))
    if strategy == "fsdp2":
        return BasesSource(path=path)  # each rank reads its slices
    bases = load_bases(path)[0].truncate(k)
    return BasesSource(bases=bases.to(device))


def _rows_of_weights(params: dict[str, nn.Parameter], world_size: int, rank: int) -> dict[str, RowShardBasis]:
    """Full-rank slices from the (still pretrained) sharded weights: each rank's rows of ``W0``."""
    out = {}
    for name, param in params.items():
        shape = (int(param.shape[0]), int(param.shape[1]))
        rows = row_range(shape[0], world_size, rank)
        local = local_tensor(param).detach()
        w0 = local.to(torch.promote_types(local.dtype, torch.float32)).clone()
        empty = w0.new_zeros(0, 0)
        out[name] = RowShardBasis(shape, rows, empty, empty, empty, w0)
    return out


def _lora_full_slices(lora: dict[str, Any], world_size: int, rank: int) -> dict[str, RowShardBasis]:
    """Full-rank LoRA slices (no tensors: the penalty is ``lambda ||s B A||^2``), shaped from the adapters:
    ``lora_B`` is m x r and ``lora_A`` r x n (global shapes, also of DTensors)."""
    out = {}
    for name, parts in lora.items():
        shape = (int(parts.b.shape[0]), int(parts.a.shape[1]))
        out[name] = lora_full_slice(shape, row_range(shape[0], world_size, rank), local_tensor(parts.b))
    return out


def make_penalty(
    spec: MethodSpec,
    config: TrainConfig,
    model: nn.Module,
    names: list[str],
    source: BasesSource | None,
    *,
    k: int | float,
    world_size: int,
    rank: int,
    device: torch.device,
) -> Any:
    """After the model is wrapped: the penalty over the matrices ``names`` of ``model`` (the unwrapped module
    under DDP), or None for an unpenalized method. For a LoRA method it penalizes the adapters that wrap those
    matrices (``names`` are the base model's, as the bases are)."""
    from rpsft.core.regularizer import RPSFTRegularizer

    if not spec.uses_bases or source is None:
        return None
    lora = find_sharded_lora_parts(model, names) if spec.adapter == "lora" else None
    params: dict[str, nn.Parameter] = {}
    if lora is None:
        named = parameter_names(model)
        params = {name: named[name] for name in names}
    if source.bases is not None:
        missing = sorted(set(names) - set(source.bases.entries))
        if missing:
            raise ConfigError(
                f"layers: the bases hold no basis for {missing[:3]}. Fix: bases computed for this model's "
                "selection (the same layers)"
            )
        bases = Bases(
            {name: source.bases.entries[name] for name in names},
            source.bases.method,
            source.bases.fingerprint,
        )
        if lora is not None:
            return RPSFTRegularizer(bases, config.lam, period=config.period, lora=lora)
        return RPSFTRegularizer(
            bases.bind(params), config.lam, period=config.period, mode=config.penalty_mode
        )
    if source.from_weights and lora is not None:
        shards = _lora_full_slices(lora, world_size, rank)
    elif source.from_weights:
        shards = _rows_of_weights(params, world_size, rank)
    else:
        shards = load_row_shard(
            source.path,
            world_size,
            rank,
            k=k,
            lora=lora is not None,
        )
    missing = sorted(set(names) - set(shards))
    if missing:
        raise ConfigError(
            f"layers: the bases file {source.path} holds no basis for {missing[:3]}. Fix: a bases file of this "
            "model's selection (the same layers)"
        )
    shards = {name: shards[name].to(device) for name in names}
    if lora is not None:
        return ShardedLoRAPenalty(shards, lora, config.lam, period=config.period)
    return ShardedRPSFTPenalty(shards, params, config.lam, period=config.period, mode=config.penalty_mode)


def penalty_bytes(penalty: Any) -> int:
    """The bytes of bases one rank holds (its slices under FSDP2, the full bases under DDP)."""
    if penalty is None:
        return 0
    if isinstance(penalty, (ShardedRPSFTPenalty, ShardedLoRAPenalty)):
        return sum(shard.nbytes() for shard in penalty.shards.values())
    return penalty.bases.nbytes()

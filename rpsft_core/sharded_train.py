"""One training run from a :class:`TrainConfig`, executed on every rank of an initialized process group.

:func:`train_on_rank` is what each worker of a sharded trial runs (Ray Train initializes the process group:
gloo on CPU, NCCL on GPU; :func:`rpsft.core.fsdp.spawn_local` does the same on one machine). A process group
of one rank works too.

* Data: the examples of ``config.data`` in a deterministic order (a permutation per epoch, seeded by
  ``config.seed``; the epochs follow one another as one stream, so every optimizer step sees
  ``batch_size * world_size * grad_accum`` examples). ``batch_size`` is per device, as with the HF Trainer. Each
  optimizer step is ``grad_accum`` micro-batches; each rank takes its rows of each micro-batch
  (:func:`rpsft.core.fsdp.local_rows` order).
* Loss: the mean token loss over every scored token of the step (all micro-batches, all ranks), so any world
  size and any split into micro-batches give the same update (:func:`rpsft.core.fsdp.train_steps`).
* ``resources.strategy: fsdp2`` shards the model with :func:`rpsft.core.fsdp.shard_model` and applies
  :class:`rpsft.core.sharded_penalty.ShardedRPSFTPenalty` on row slices of the bases file (no rank holds a full
  ``Uk``); ``ddp`` replicates the model under ``DistributedDataParallel`` with
  :class:`rpsft.core.regularizer.RPSFTRegularizer` on full bases.
* ``lora`` and ``rpsft-lora``: the PEFT LoRA model of the single-process path
  (:func:`rpsft.core.methods.add_adapters`) is built before sharding (FSDP2 shards the adapters with their
  blocks) and only the adapters train; ``rpsft-lora`` applies
  :class:`rpsft.core.sharded_penalty.ShardedLoRAPenalty` under FSDP2 (``RPSFTRegularizer(lora=...)`` under DDP).
* Checkpoints: ``torch.distributed.checkpoint`` under ``<output_dir>/dcp/step-<N>`` every
  ``checkpoint_every`` steps (model, optimizer, scheduler, step, data position, log history), a marker file
  once a save is complete, only the latest kept; a rerun resumes from the latest complete one.
* At the end: rank 0 writes ``<output_dir>/metrics.json`` and, with ``save_model``, a consolidated HF
  checkpoint ``<output_dir>/model`` (safetensors + tokenizer) that :func:`rpsft.core.models.load_model` reads;
  for LoRA its weights are the merged ``W0 + s B A`` (as ``merge_and_unload`` gives).

Supported methods: ``sft``, ``dft``, ``rpsft``, ``l2-init``, ``lora``, ``rpsft-lora``
(:func:`sharded_method_plan` is the one place that decides; ``osf`` and ``iw`` raise a :class:`ConfigError`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from rpsft.core.errors import ConfigError
from rpsft.core.fsdp import (
    CHECKPOINT_PREFIX,
    adamw,
    checkpoint_blocks,
    parameter_names,
    shard_model,
    train_steps,
)
from rpsft.core.precision import resolve_mixed_precision
from rpsft.core.sharded_penalty import (
    RowShardBasis,
    ShardedLoRAPenalty,
    ShardedRPSFTPenalty,
    _lora_full_slice,
    find_sharded_lora_parts,
    load_row_shard,
    local_tensor,
    row_range,
)
from torch import nn

SHARDED_METHODS: tuple[str, ...] = ("sft", "dft", "rpsft", "l2-init", "lora", "rpsft-lora")
SHARDED_ADAPTERS: tuple[str | None, ...] = (None, "lora")
ADAPTER_NAMES = {"lora": "LoRA", "osf": "OSF"}
DCP_DIR = "dcp"
COMPLETE_MARKER = "complete.json"


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


# ------------------------------------------------------------------------------------------ the method


@dataclass(frozen=True)
class ShardedMethodPlan:
    """How one method trains under FSDP2/DDP: its token loss, whether it has a penalty (with bases), and its
    PEFT adapter (``"lora"``, or None for full fine-tuning)."""

    method: str
    loss_type: str
    uses_bases: bool
    adapter: str | None = None


def sharded_method_plan(config: TrainConfig) -> ShardedMethodPlan:
    """The plan of ``config.method`` for sharded training, or a :class:`ConfigError` for a method that
    cannot run there (OSF adapters, and ``iw``, which keeps a frozen reference model)."""
    spec = config.spec
    if spec.adapter not in SHARDED_ADAPTERS or spec.reference_model or config.method not in SHARDED_METHODS:
        what = (
            f"{ADAPTER_NAMES.get(spec.adapter, spec.adapter)} adapters"
            if spec.adapter
            else "a frozen reference model"
        )
        raise ConfigError(
            f"method: {config.method!r} with resources.workers: {config.resources.workers} "
            f"(strategy {config.resources.strategy}); it trains {what}, and sharded training runs only "
            f"{', '.join(SHARDED_METHODS)}. Fix: resources.workers: 1, which trains it in one process "
            "(rpsft.core.train.train), or one of those methods"
        )
    return ShardedMethodPlan(config.method, spec.loss, spec.uses_bases, spec.adapter)


@dataclass
class BasesSource:
    """Where each rank's bases come from: a bases file (``path``), the rank's own pretrained weights
    (``from_weights``: full rank, each rank's rows of ``W0``), or bases already in memory (``bases``, DDP)."""

    path: Path | None = None
    from_weights: bool = False
    bases: Bases | None = None


def prepare_bases_source(
    plan: ShardedMethodPlan,
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

    if not plan.uses_bases:
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

    path = Path(_from_rank0(find_or_compute, "bases"))
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
        out[name] = _lora_full_slice(shape, row_range(shape[0], world_size, rank), local_tensor(parts.b))
    return out


def make_penalty(
    plan: ShardedMethodPlan,
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
    under DDP), or None for an unpenalized method. For a LoRA plan it penalizes the adapters that wrap those
    matrices (``names`` are the base model's, as the bases are)."""
    from rpsft.core.regularizer import RPSFTRegularizer

    if not plan.uses_bases or source is None:
        return None
    lora = find_sharded_lora_parts(model, names) if plan.adapter == "lora" else None
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


# ------------------------------------------------------------------------------------------ process group


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


def _from_rank0(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` run on rank 0 only, its (picklable) result broadcast to every rank; an error on rank 0 is
    raised on every rank instead of leaving the others waiting."""
    import torch.distributed as dist

    rank, world_size = _world()
    if world_size == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as exc:  # re-raised below, after every rank has heard of it
            error = exc
            box = [("error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"{what}: failed on rank 0 ({value})")
    return value


def _all_reduce_max(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if _world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def rank_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` (modulo the visible GPUs) when CUDA is available, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", _world()[0]))
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def check_sharded_settings(config: TrainConfig) -> ShardedMethodPlan:
    """The checks of the config alone (before any process starts): the method, the optimizer, mixed precision
    and the scheduler under sharded training."""
    plan = sharded_method_plan(config)
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
    return plan


def check_sharded_config(config: TrainConfig) -> ShardedMethodPlan:
    """The cheap checks, before any data or model is loaded: :func:`check_sharded_settings`, and the process
    group against ``resources.workers``."""
    import torch.distributed as dist

    plan = check_sharded_settings(config)
    workers = config.resources.workers
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed: no process group is initialized. Fix: call train_on_rank on every worker of a "
            "process group (Ray Train, torchrun, or rpsft.core.fsdp.spawn_local)"
        )
    world_size = dist.get_world_size()
    if world_size != workers:
        raise ConfigError(
            f"resources.workers: {workers}, but this process group has {world_size} rank(s). "
            f"Fix: resources.workers: {world_size}, or start {workers} workers"
        )
    return plan


# ------------------------------------------------------------------------------------------ data


class ExampleStream:
    """Example indices as one stream over the epochs: epoch ``e`` is a permutation of ``range(n)`` seeded by
    ``(seed, e)``, so the order is fixed by the seed and any position can be found again (a resumed run)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            import numpy as np

            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._orders[epoch] = rng.permutation(self.n).tolist()
        return self._orders[epoch]

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return self.order(epoch)[offset]


def rank_step_batches(
    dataset: Any,
    stream: ExampleStream,
    *,
    start_position: int,
    steps: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    pad_token_id: int,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """This rank's micro-batches of each optimizer step: step ``s`` covers the stream positions
    ``[start + s G, start + (s + 1) G)`` with ``G = batch_size * world_size * grad_accum``; micro-batch ``j`` is
    ``batch_size * world_size`` of them, of which this rank collates its rows (:func:`row_range` order)."""
    from rpsft.core.data import collate_features

    micro = batch_size * world_size
    start, end = row_range(micro, world_size, rank)
    position = start_position
    for _ in range(steps):
        batches = []
        for j in range(grad_accum):
            first = position + j * micro
            features = [dataset[stream[first + r]] for r in range(start, end)]
            batches.append(collate_features(features, pad_token_id))
        position += micro * grad_accum
        yield batches


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``<output_dir>/dcp/step-<N>`` whose save finished (its marker file exists), or None."""
    done = [
        path
        for path in (Path(output_dir) / DCP_DIR).glob("step-*")
        if path.name.removeprefix("step-").isdigit() and (path / COMPLETE_MARKER).is_file()
    ]
    return max(done, key=checkpoint_dir_step, default=None)


def resumed_batch_mismatch(checkpoint: str | os.PathLike, global_batch: int) -> str | None:
    """Why resuming ``checkpoint`` at ``global_batch`` examples per step changes the run, or None: the data
    position is counted in examples, so the same example order continues, cut into other steps."""
    marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    step, seen = int(marker["step"]), int(marker["examples_seen"])
    if step < 1 or seen == step * global_batch:
        return None
    return (
        f"resume: the checkpoint {checkpoint} took {seen // step} examples per optimizer step, this run takes "
        f"{global_batch} (batch_size x workers x grad_accum); steps after {step} see other groups of examples "
        "than the interrupted run would have. Fix: resume with the same batch_size x workers x grad_accum, "
        "or accept the different run"
    )


class TrainState:
    """Model, optimizer, scheduler and progress as one ``torch.distributed.checkpoint`` ``Stateful``: the
    model and optimizer through ``get_state_dict`` / ``set_state_dict`` (sharded FQNs without wrapper
    prefixes), the progress (step, data position, loss sum, log history) as JSON text."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.progress: dict[str, Any] = {
            "step": 0,
            "examples_seen": 0,
            "loss_sum": 0.0,
            "log_history": [],
            "drift_history": [],
        }

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "progress": json.dumps(self.progress),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = json.loads(state["progress"])


def save_checkpoint(state: TrainState, output_dir: str | os.PathLike, step: int) -> Path:
    """Save ``<output_dir>/dcp/step-<step>`` (collective), then rank 0 writes its marker and removes every
    other checkpoint directory; returns the directory."""
    import torch.distributed.checkpoint as dcp

    rank, world_size = _world()
    root = Path(output_dir) / DCP_DIR
    target = root / f"step-{step}"
    if rank == 0 and target.exists():
        shutil.rmtree(target)  # a save of this step that did not finish
    _barrier()
    dcp.save({"train": state}, checkpoint_id=str(target))
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "examples_seen": state.progress["examples_seen"]}
        (target / COMPLETE_MARKER).write_text(json.dumps(marker))
        for other in root.glob("step-*"):
            if other != target:
                shutil.rmtree(other, ignore_errors=True)
    _barrier()
    return target


def load_checkpoint(state: TrainState, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load({"train": state}, checkpoint_id=str(path))


# ------------------------------------------------------------------------------------------ consolidated model


def tied_aliases(model: nn.Module) -> set[str]:
    """The names (wrapper prefixes removed) under which a parameter appears a second time: a tied output
    head, saved once under its first name as Hugging Face checkpoints are."""
    seen: set[int] = set()
    aliases: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name.replace(CHECKPOINT_PREFIX, ""))
        seen.add(id(param))
    return aliases


PEFT_PREFIX = "base_model.model."


def merged_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state of a PEFT LoRA model (plain names, as :func:`save_consolidated` gathers it) as the state
    of its base model with every active adapter merged: ``W0 + s B A`` under the name of ``W0``, computed as
    PEFT's ``merge_and_unload`` does (``(B @ A) * s`` in the adapter's dtype, through float32 for a
    bfloat16/float16 adapter on CPU, added to ``W0`` in place). The adapters' own entries are dropped."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    merged = dict(state)
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = module_name.replace(CHECKPOINT_PREFIX, "")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(
                adapter
            ):
                raise ValueError(
                    f"lora: {name} uses a LoRA variant or a LoRA bias, which the consolidated checkpoint does "
                    "not merge. Fix: plain LoRA adapters (no DoRA, no lora_bias)"
                )
            a = merged[f"{name}.lora_A.{adapter}.weight"]
            b = merged[f"{name}.lora_B.{adapter}.weight"]
            dtype = b.dtype
            cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
            if cast:
                a, b = a.float(), b.float()
            delta = transpose(b @ a, module.fan_in_fan_out) * module.scaling[adapter]
            if cast:
                delta = delta.to(dtype)
            key = f"{name}.base_layer.weight"
            merged[key] = merged[key].clone().add_(delta)
    out = {}
    for key, tensor in merged.items():
        if ".lora_" in key:
            continue
        plain = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        out[plain] = tensor
    return out


def save_consolidated(model: nn.Module, inner: nn.Module, tokenizer: Any, target: Path) -> Path | None:
    """Gather the full weights to rank 0's CPU (collective) and write an HF checkpoint there: safetensors,
    config, tokenizer. ``inner`` is the unwrapped model (the FSDP2 root itself, or DDP's ``module``); a PEFT
    LoRA model is saved as its base model with the adapters merged (:func:`merged_lora_state`).
    Returns ``target`` on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = _world()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if rank == 0:
        aliases = tied_aliases(inner)
        state = {name.replace(CHECKPOINT_PREFIX, ""): t for name, t in state.items() if name not in aliases}
        base = inner
        if hasattr(inner, "get_base_model"):  # PEFT
            state = merged_lora_state(inner, state)
            base = inner.get_base_model()
        if target.exists():
            shutil.rmtree(target)
        base.save_pretrained(target, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(target)
        out = target
    del state
    _barrier()
    return out


# ------------------------------------------------------------------------------------------ the run


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

    return _from_rank0(
        lambda: resolve_k_from_prompts(model, tokenizer, config.effective_k, config.auto_k_prompts), "k: auto"
    )


def _drift_summary(drift: dict[str, float]) -> dict[str, float]:
    values = list(drift.values())
    return {"rpsft/drift_mean": sum(values) / len(values), "rpsft/drift_max": max(values)} if values else {}


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
    plan = check_sharded_config(config)
    from rpsft.core.data import SFTCollator, build_sft_dataset, load_examples
    from rpsft.core.models import load_model, load_tokenizer, resolve_model_dir
    from rpsft.core.selection import select_matrices
    from transformers import get_scheduler, set_seed

    rank, world_size = _world()
    device = rank_device()
    strategy = config.resources.strategy
    precision = resolve_mixed_precision(config.mixed_precision, device)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)

    source_dir = config.model
    if model is None or tokenizer is None:  # rank 0 fills the model cache (an embedded model, a GGUF) once
        source_dir = _from_rank0(lambda: resolve_model_dir(config.model, config.cache_dir), "model")
    if tokenizer is None:
        tokenizer = load_tokenizer(source_dir, config.cache_dir)
    examples = load_examples(config.data, limit=config.data_limit, seed=config.seed)
    dataset = build_sft_dataset(examples, tokenizer, config.max_length)
    if model is None:
        model, _ = load_model(source_dir, dtype=config.dtype, cache_dir=config.cache_dir)
    model.to(device)
    selection = select_matrices(model, config.layers)
    names = list(selection)

    k_resolved = _resolve_auto_k(config, model, tokenizer)
    k = config.effective_k if k_resolved is None else k_resolved
    if plan.adapter is not None:
        from rpsft.core.methods import add_adapters

        set_seed(config.seed)  # every rank draws the same initial adapters
        model = add_adapters(model, config, selection)
    started = time.perf_counter()
    source = prepare_bases_source(
        plan, config, selection, k, bases_file=bases_file, device=device, bases_dir=bases_dir
    )
    bases_seconds = time.perf_counter() - started
    del selection  # the parameters are replaced by their shards
    # activation checkpointing turns the KV cache off for training; the trained model gets it back
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    wrapped = _wrap(model, config, device, world_size)
    inner = model  # FSDP2 shards in place; DDP keeps the model as .module
    started = time.perf_counter()
    penalty = make_penalty(
        plan, config, inner, names, source, k=k, world_size=world_size, rank=rank, device=device
    )
    bases_seconds += time.perf_counter() - started
    del source

    fused = config.optimizer == "adamw_torch_fused" and device.type == "cuda"
    optimizer = adamw(inner, config.learning_rate, config.weight_decay, fused=fused)
    global_batch = config.batch_size * world_size * config.grad_accum
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * len(dataset) / global_batch))
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(max_steps * config.warmup_ratio),
        num_training_steps=max_steps,
    )
    state = TrainState(wrapped, optimizer, scheduler)
    resume_from = None
    if config.checkpoint_every:
        found = _from_rank0(lambda: latest_complete_checkpoint(out_dir), "checkpoint")
        resume_from = Path(found) if found is not None else None
    if resume_from is not None:
        if rank == 0 and (mismatch := resumed_batch_mismatch(resume_from, global_batch)) is not None:
            warnings.warn(mismatch, RuntimeWarning, stacklevel=2)  # rank 0 alone reads the marker and warns
        load_checkpoint(state, resume_from)
    progress = state.progress
    resumed_from_step = int(progress["step"]) if resume_from is not None else 0

    def after_step(record: dict[str, Any]) -> None:
        step = record["step"]
        progress["step"] = step
        progress["examples_seen"] += global_batch
        progress["loss_sum"] += record["loss"]
        entry = {
            "loss": record["loss"],
            "grad_norm": record["grad_norm"],
            "learning_rate": record["learning_rate"],
            "epoch": progress["examples_seen"] / len(dataset),
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
        wrapped,
        batches,
        optimizer,
        penalty=penalty,
        max_grad_norm=config.max_grad_norm,
        scheduler=scheduler,
        loss_type=plan.loss_type,
        start_step=start_step,
        local=True,
        autocast_dtype=torch.bfloat16 if strategy == "ddp" and precision == "bf16" else None,
        after_step=after_step,
    )
    train_seconds = _all_reduce_max(time.perf_counter() - started, device)
    if use_cache is not None:
        inner.config.use_cache = use_cache

    drift = penalty.drift() if penalty is not None else {}
    model_dir = None
    if config.save_model:
        save_consolidated(wrapped, inner, tokenizer, out_dir / "model")
        model_dir = out_dir / "model"
    steps_done = int(progress["step"])
    metrics = {
        "config": config.model_dump(mode="json", by_alias=True),
        "k_resolved": k_resolved,
        "train_loss": progress["loss_sum"] / steps_done if steps_done else 0.0,
        "global_steps": steps_done,
        "train_seconds": train_seconds,
        "resumed_from_step": resumed_from_step,
        "bases_seconds": bases_seconds,
        "n_examples": len(dataset),
        "n_dropped_examples": dataset.n_dropped,
        "n_matrices": len(names),
        "bases_bytes": _penalty_bytes(penalty),
        "log_history": progress["log_history"],
        "drift": drift,
        "drift_history": progress["drift_history"],
        "drift_mean": sum(drift.values()) / len(drift) if drift else 0.0,
        "workers": world_size,
        "strategy": strategy,
    }
    if rank == 0:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _barrier()
    return ShardedTrainResult(metrics, drift, out_dir, rank, world_size, model_dir, inner)


def _penalty_bytes(penalty: Any) -> int:
    """The bytes of bases one rank holds (its slices under FSDP2, the full bases under DDP)."""
    if penalty is None:
        return 0
    if isinstance(penalty, (ShardedRPSFTPenalty, ShardedLoRAPenalty)):
        return sum(shard.nbytes() for shard in penalty.shards.values())
    return penalty.bases.nbytes()


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
    from rpsft.core.fsdp import spawn_local

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

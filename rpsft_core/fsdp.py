"""FSDP2 / DDP for one training run over several workers: shard a causal LM and run its optimizer steps.

:func:`shard_model` applies ``fully_shard`` to each decoder block, then to the root (which holds the embeddings,
the final norm and a tied output head), with an optional bf16 :class:`MixedPrecisionPolicy` and activation
checkpointing. Parameters become DTensors sharded by rows (``Shard(0)``), the layout
:mod:`rpsft.core.sharded_penalty` works on. :func:`train_steps` runs the optimizer steps of a sharded (or
DDP-wrapped) model with the mean token loss of each step over every rank; the process group itself is
:mod:`rpsft.core.distributed`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from rpsft.core.distributed import all_reduce_sum, world
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (``model.model.layers`` for Llama, Qwen, Gemma and most causal LMs)."""
    for path in (
        "model.layers",
        "model.model.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.decoder.layers",
    ):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(
        f"model: no stack of decoder blocks found in {type(model).__name__}. Fix: a causal LM whose blocks are "
        "model.layers (Llama, Qwen, Gemma, Mistral)"
    )


def checkpoint_blocks(model: nn.Module) -> nn.ModuleList:
    """Wrap each decoder block in place for activation checkpointing (non-reentrant: each block's activations
    are recomputed in the backward pass); returns the blocks. Parameter names gain the wrapper's prefix
    (:data:`CHECKPOINT_PREFIX`), which :func:`parameter_names` and ``torch.distributed.checkpoint`` remove.
    The model's KV cache is switched off (``config.use_cache = False``): the recompute would append each
    block's keys and values to it a second time."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block)
    return blocks


def shard_model(
    model: nn.Module,
    mesh: Any = None,
    *,
    mixed_precision: str | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """``fully_shard`` each decoder block, then the root, in place; returns the model.

    ``mixed_precision="bf16"`` computes in bfloat16 and reduces gradients in float32 while the sharded
    parameters (and so the optimizer states) stay in their own dtype. ``activation_checkpointing`` recomputes
    each block's activations in the backward pass."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in (None, "no", "bf16"):
        raise ValueError(f"mixed_precision: {mixed_precision!r} under FSDP2. Fix: bf16 or none")
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    blocks = checkpoint_blocks(model) if activation_checkpointing else decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


# ------------------------------------------------------------------------------------------- training

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def parameter_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by their plain names (activation checkpointing's wrapper prefix removed), so
    basis names (``model.layers.0.self_attn.q_proj.weight``) find the sharded parameters."""
    return {name.replace(CHECKPOINT_PREFIX, ""): param for name, param in model.named_parameters()}


def adamw(
    model: nn.Module, learning_rate: float, weight_decay: float, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW with the Trainer's decay groups (no decay for biases and norm weights); ``fused``: the fused
    CUDA kernel (``optimizer: adamw_torch_fused``)."""
    from transformers import Trainer

    decay = {name.replace(CHECKPOINT_PREFIX, "") for name in Trainer.get_decay_parameter_names(None, model)}
    named = parameter_names(model)
    groups = [
        {
            "params": [p for n, p in named.items() if n in decay and p.requires_grad],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in named.items() if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, fused=fused or None)


def local_rows(batch: dict[str, torch.Tensor], world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (the data is sharded across the workers, ``torch.chunk`` order)."""
    from rpsft.core.row_shards import row_range

    start, end = row_range(next(iter(batch.values())).shape[0], world_size, rank)
    return {key: value[start:end] for key, value in batch.items()}


StepBatches = Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]


def train_steps(
    model: nn.Module,
    batches: Iterable[StepBatches],
    optimizer: torch.optim.Optimizer,
    *,
    penalty: Any = None,
    max_grad_norm: float = 1.0,
    scheduler: Any = None,
    loss_type: str = "sft",
    start_step: int = 0,
    local: bool = False,
    autocast_dtype: torch.dtype | None = None,
    after_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One optimizer step per item of ``batches``: a global batch, or a list of global micro-batches (gradient
    accumulation). Each micro-batch: this rank's rows forward and backward; then the penalty's gradient
    (:meth:`ShardedRPSFTPenalty.add_grad_` or :meth:`RPSFTRegularizer.add_grad_`), clipping at
    ``max_grad_norm`` (0: none, the norm is still measured), the update, ``scheduler.step()``. A penalty with
    ``mode == "decoupled"`` adds no gradient: its ``prox_step_`` runs after the update, at the learning rate the
    update used, before ``scheduler.step()``.

    The loss is the token loss (``sft``: NLL; ``dft``: NLL times the detached token probability) summed over
    this rank's tokens of every micro-batch and divided by the scored tokens of the whole step on all ranks
    (one all-reduce), times the world size because FSDP2 and DDP average gradients over ranks: every world size
    and every split into micro-batches gives the gradient of the mean token loss of the step's examples.
    ``local``: the batches already hold only this rank's rows. ``autocast_dtype``: the forward under
    ``torch.autocast`` (DDP mixed precision; FSDP2 has its own policy). Steps are numbered from
    ``start_step + 1`` (the penalty's period counts them). A DDP model skips the gradient all-reduce on all
    but the last micro-batch.

    Returns per step (and passes each to ``after_step``, on every rank) the step, the global loss, the
    penalty (None when its period skips the step or there is none; decoupled: after the proximal step), the
    gradient norm before clipping and
    the learning rate the update used. The all-reduced buffers live on the parameters' device (NCCL needs
    CUDA tensors). A non-finite loss raises
    :class:`rpsft.core.trainer.NonFiniteLossError` on every rank before the update."""
    from rpsft.core.losses import IGNORE_INDEX, causal_lm_logits, dft_loss, sft_loss, token_logprobs
    from rpsft.core.regularizer import step_learning_rate
    from rpsft.core.trainer import NonFiniteLossError

    if loss_type not in ("sft", "dft"):
        raise ValueError(f"loss_type: {loss_type!r} under FSDP2/DDP. Fix: sft or dft")
    rank, world_size = world()
    device = next(iter(parameter_names(model).values())).device
    step_loss = dft_loss if loss_type == "dft" else sft_loss
    clip_at = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    decoupled = penalty is not None and getattr(penalty, "mode", "loss") == "decoupled"
    history = []
    model.train()
    for step, item in enumerate(batches, start=start_step + 1):
        micro = [item] if isinstance(item, Mapping) else list(item)
        rows = micro if local else [local_rows(batch, world_size, rank) for batch in micro]
        local_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in rows)
        global_tokens = all_reduce_sum(
            torch.tensor([float(local_tokens)], dtype=torch.float64, device=device)
        )
        scale = world_size / max(float(global_tokens), 1.0)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for index, batch in enumerate(rows):
            last = index == len(rows) - 1
            sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
            cast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with sync:
                with cast:
                    logits, window_labels = causal_lm_logits(
                        model, {k: v.to(device) for k, v in batch.items()}
                    )
                logp, mask = token_logprobs(logits, window_labels)
                token_loss = step_loss(logp, mask, num_items=1)  # the sum; scaled to the step's mean below
                (token_loss * scale).backward()
            loss_sum += token_loss.detach().to(torch.float64)
        loss = float(all_reduce_sum(loss_sum) / max(float(global_tokens), 1.0))
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(loss, step)
        value = penalty.add_grad_(step) if penalty is not None and not decoupled else None
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_at)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        learning_rate = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if decoupled and penalty.applies_at(step):
            value = penalty.prox_step_(step_learning_rate(optimizer, penalty.parameters()), step)
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step,
            "loss": loss,
            "penalty": value,
            "grad_norm": float(grad_norm),
            "learning_rate": learning_rate,
        }
        history.append(record)
        if after_step is not None:
            after_step(record)
    return history


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full (unsharded) CPU tensor, by plain name; collective: call on every rank."""
    out = {}
    for name, param in parameter_names(model).items():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = tensor.detach().cpu().clone()
    return out

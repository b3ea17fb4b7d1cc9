"""The tensor memory of one worker for one steady-state training step: :func:`estimate_worker_memory`.

A worker sees ``T = batch_size * max_length`` tokens per micro-batch; ``p`` is the parameter dtype's size (4 or
2 bytes), ``c`` the compute dtype's (2 bytes under mixed precision or 16-bit parameters, else 4).

Rules, in bytes per worker (``N`` is ``workers`` under ``fsdp2``, else 1):

* ``weights = n_params * p / N``; ``grads = trainable * p / N`` (gradients in the parameter dtype);
  ``optimizer_states``: AdamW's two moments ``2 * trainable * p / N``, none for ``sgd``, and for
  ``adafactor`` its factored moments (rows + columns, counted as 0); ``bases``: the protected bases,
  ``(bases_bytes_total - bases_replicated_bytes) / N + bases_replicated_bytes`` (FSDP2 ranks hold the rows
  of ``Uk`` / ``W0`` and all of ``Vk`` and ``Sref``); ``reference_model = n_params * p`` with
  ``with_reference_model``. The per-matrix rounding of the shards is ignored.
* ``activations`` (tensors saved for backward, Llama-style block, SDPA attention so no ``s^2`` score
  tensor). Counted from what a ``LlamaDecoderLayer`` saves, per token, with ``h`` hidden, ``q`` query
  width, ``kv`` key/value width (``q`` with ``repeat_kv``), ``i`` intermediate:

  - each RMSNorm: its input in float32 (the upcast copy, or the float32 residual itself), the normalized
    tensor and the weighted output: ``(4 + 2c) h``;
  - attention: rotated q, k, v, and the attention output (which is also ``o_proj``'s input):
    ``c (2q + 2kv)`` (plus the per-head logsumexp, ignored);
  - MLP: gate, up, act(gate) and act(gate) * up (``down_proj``'s input): ``4c i``.

  The residual sums are the next norm's inputs, so a block saves ``2(4 + 2c) h + c(2q + 2kv + 4i)``.
  Under autocast (float32 weights, 16-bit compute on ``single`` / ``ddp``) the residual stream stays
  float32 and every projection saves its own 16-bit cast of its input: ``26h + 4q + 4kv + 8i``. Blocks
  with more norms (Gemma-3's four) add ``(4 + 2c) h`` each. The final norm adds ``(4 + 2c) h`` (autocast
  ``10h``). Without checkpointing all ``n_layers`` blocks are held; with ``activation_checkpointing``
  each block keeps only its input (``c h``, autocast ``4h``) and one block is recomputed in full during
  backward (``recomputed_block``).
* ``logits = 12 T vocab``: the token loss upcasts the logits to float32; at the start of backward the
  saved log-softmax, its gradient and the logits' gradient are alive together, 4 bytes each (the
  compute-dtype logits are freed with the loss's inputs). With a reference model (``iw``) the peak is
  while the reference's logits (``c``), their float32 copy and log-softmax (4 each) are alive next to the
  policy's logits and log-softmax: ``(12 + 2c) T vocab``.
* ``buffers``, alive through forward and backward: under ``fsdp2``, the all-gathered (unsharded, compute
  dtype) parameters of the root (embeddings, final norm, output head: FSDP2 keeps the root gathered from
  forward to the end of backward) and of 2 blocks (the current one and the prefetched one), the unsharded
  gradients of the root (the output head's exists from the start of backward) and of 1 block, and that
  block's reduce-scatter input in the reduce dtype ``r`` (float32 under ``bf16`` mixed precision, else
  ``p``): ``(3c + r) n_block + 2c n_root``. Under autocast, the 16-bit copies of the block and head
  weights that the matmuls save for backward: ``2 (n_layers n_block + vocab h)``; with checkpointing
  only the head's and one recomputed block's are saved (``2 (n_block + vocab h)``), and ``cast_cache``
  is the other blocks' copies, which autocast's cast cache holds until the forward returns. Else 0.
* ``root_reduce``: under ``fsdp2``, the reduce-scatter input of the root's gradients, ``r n_root``, made
  at the end of backward (the largest one when the vocabulary is large).
* ``grad_buckets``: ``ddp`` keeps its all-reduce buckets next to the gradients, as large as the gradients
  (torch's default ``gradient_as_bucket_view=False``). Else 0.
* ``step_temporaries``: the foreach AdamW (torch's default on GPU) makes one parameter-sized temporary
  (``sqrt`` of the second moment) of the trainable parameters (their shard under ``fsdp2``); the fused
  AdamW and ``sgd`` none; ``adafactor`` two of the largest matrix (it steps one tensor at a time). On
  CPU, torch's default AdamW loops over tensors and makes less than counted.

The phases (``total`` is the largest):

* ``load_peak`` (``fsdp2``): ``n_params * p``, the whole model, which each rank loads onto its device
  before sharding it (:func:`rpsft.core.sharded_train.train_on_rank`); the other strategies hold it whole
  in every phase;
* ``forward_backward_peak``: weights, optimizer states, bases, reference model, grad buckets, buffers and
  activations, plus, without checkpointing, the logits: the peak is at the start of backward, where the
  gradients do not exist yet (the ``Trainer`` sets them to ``None`` after each step, and backward creates
  them while it frees the activations). With checkpointing, plus the largest of the logits, the cast
  cache with the forward's compute-dtype logits (``c T vocab``), and one recomputed block with the
  gradients (backward recomputes the blocks after the logits are freed, while the gradients of the later
  blocks already exist). With ``grad_accum > 1`` the gradients are held throughout and counted in every
  case;
* ``backward_end_peak`` (``fsdp2``): weights, gradients, optimizer states, bases, the root's gathered
  parameters and unsharded gradients (``2c n_root``) and ``root_reduce``;
* ``optimizer_step_peak``: weights, gradients, optimizer states, bases, reference model, grad buckets and
  the step's temporaries; it also covers the end of backward of the other strategies, where nearly all
  gradients exist and few activations.

Measured on a tiny Llama (hidden 64, 2 layers, batch 4 x 64) with ``MemTracker``: the estimate is
0.97-1.00 x the peak without checkpointing and 1.00-1.12 x with it (float32, bfloat16 and autocast; with
and without an attention mask; ``tests/test_memory_preflight.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from rpsft.core.errors import ConfigError
from rpsft.core.memory.dims import ModelDims
from rpsft.core.memory.report import EstimateInputs, MemoryEstimate

Strategy = Literal["fsdp2", "ddp", "single"]
ParamDtype = Literal["float32", "bfloat16", "float16"]
MixedPrecision = Literal["bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_fused", "sgd", "adafactor"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class _Run(EstimateInputs):
    """The inputs of one estimate (:func:`estimate_worker_memory`'s, checked) and the sizes its rules read."""

    @property
    def p(self) -> int:
        """Bytes of the parameter dtype."""
        return DTYPE_BYTES[self.param_dtype]

    @property
    def c(self) -> int:
        """Bytes of the compute dtype: 2 under mixed precision or with 16-bit parameters, else 4."""
        return 2 if self.mixed_precision is not None or self.param_dtype != "float32" else 4

    @property
    def shards(self) -> int:
        """``N``: the workers under ``fsdp2``, else 1."""
        return self.workers if self.strategy == "fsdp2" else 1

    @property
    def autocast(self) -> bool:
        """float32 weights under 16-bit autocast (``single`` / ``ddp`` with mixed precision)."""
        return self.strategy != "fsdp2" and self.mixed_precision is not None and self.param_dtype == "float32"

    @property
    def regime(self) -> str:
        """The activations' regime for :func:`_activation_bytes_per_token`."""
        return "autocast" if self.autocast else ("bfloat16" if self.c == 2 else "float32")

    @property
    def tokens(self) -> int:
        """``T``: the tokens of one micro-batch."""
        return self.batch_size * self.max_length

    def inputs(self) -> dict[str, object]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def _activation_bytes_per_token(dims: ModelDims, regime: str, repeat_kv: bool) -> tuple[int, int, int]:
    """``(per block, final norm, block input)`` bytes saved for backward per token, for a compute ``regime``.

    ``"float32"`` and ``"bfloat16"`` mean weights and activations in that dtype (for FSDP2 mixed precision the
    all-gathered parameters are bf16, so it is ``"bfloat16"``); ``"autocast"`` means float32 weights under
    bf16 / fp16 autocast (``single`` / ``ddp`` with ``mixed_precision``)."""
    h, q, i, norms = dims.hidden, dims.q_dim, dims.intermediate, dims.n_block_norms
    kv = q if repeat_kv and dims.n_kv_heads < dims.n_heads else dims.kv_dim
    if regime == "autocast":
        # norm 1: input, normalized (fp32), three bf16 casts of its output (q, k, v projections);
        # norm 2: input, normalized (fp32), two bf16 casts (gate, up); extra norms as norm 2.
        norm_bytes = (4 + 4 + 3 * 2) * h + (norms - 1) * (4 + 4 + 2 * 2) * h
        return norm_bytes + 2 * (2 * q + 2 * kv + 4 * i), (4 + 4 + 2) * h, 4 * h
    c = 4 if regime == "float32" else 2
    # each norm: its input in float32 (4), the normalized tensor and the weighted output (c each)
    return norms * (4 + 2 * c) * h + c * (2 * q + 2 * kv + 4 * i), (4 + 2 * c) * h, c * h


def _check_inputs(
    workers: int,
    strategy: str,
    param_dtype: str,
    mixed_precision: str | None,
    batch_size: int,
    max_length: int,
    optimizer: str,
    grad_accum: int,
) -> None:
    if workers < 1:
        raise ConfigError(f"resources.workers: {workers}. Fix: at least 1")
    if strategy not in ("fsdp2", "ddp", "single"):
        raise ConfigError(
            f"resources.strategy: {strategy!r}. Fix: fsdp2 or ddp (single: resources.workers 1)"
        )
    if strategy == "single" and workers != 1:
        raise ConfigError(
            f"resources.workers: {workers} in one process. Fix: resources.workers: 1, or resources.strategy: "
            "fsdp2 / ddp"
        )
    if param_dtype not in DTYPE_BYTES:
        raise ConfigError(f"train.dtype: {param_dtype!r}. Fix: float32, bfloat16 or float16")
    if mixed_precision not in (None, "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision: {mixed_precision!r}. Fix: bf16, fp16 or no")
    if batch_size < 1 or max_length < 1:
        raise ConfigError(
            f"train.batch_size {batch_size}, train.max_length {max_length}. Fix: both at least 1"
        )
    if optimizer not in ("adamw", "adamw_fused", "sgd", "adafactor"):
        raise ConfigError(
            f"train.optimizer: {optimizer!r} has no memory rule. Fix: adamw_torch, adamw_torch_fused, sgd or "
            "adafactor"
        )
    if grad_accum < 1:
        raise ConfigError(f"train.grad_accum: {grad_accum}. Fix: at least 1")


def _state_parts(run: _Run) -> dict[str, int]:
    """Weights, gradients, optimizer states, bases and the reference model."""
    dims, p, shards = run.dims, run.p, run.shards
    grads = math.ceil(run.trainable_params * p / shards)
    sharded_bases = max(0, run.bases_bytes_total - run.bases_replicated_bytes)
    return {
        "weights": math.ceil(dims.n_params * p / shards),
        "grads": grads,
        "optimizer_states": 2 * grads if run.optimizer in ("adamw", "adamw_fused") else 0,
        "bases": math.ceil(sharded_bases / shards) + (run.bases_bytes_total - sharded_bases),
        "reference_model": dims.n_params * p if run.with_reference_model else 0,
    }


def _activation_parts(run: _Run) -> dict[str, int]:
    """The activations saved for backward, the recomputed block and the logits."""
    dims, tokens = run.dims, run.tokens
    per_block, final_norm, block_input = _activation_bytes_per_token(dims, run.regime, run.repeat_kv)
    if run.activation_checkpointing:
        activations = tokens * (dims.n_layers * block_input + final_norm)
        recomputed_block = tokens * per_block
    else:
        activations = tokens * (dims.n_layers * per_block + final_norm)
        recomputed_block = 0
    logits = (12 + (2 * run.c if run.with_reference_model else 0)) * tokens * dims.vocab
    return {"activations": activations, "recomputed_block": recomputed_block, "logits": logits}


def _buffer_parts(run: _Run, grads: int) -> dict[str, int]:
    """The strategy's buffers, the cast cache, the root's reduce-scatter input, DDP's buckets and the
    optimizer step's temporaries."""
    dims, p, c = run.dims, run.p, run.c
    head = dims.vocab * dims.hidden
    cast_cache = root_reduce = 0
    if run.strategy == "fsdp2":
        reduce_bytes = 4 if run.mixed_precision == "bf16" else p
        buffers = (3 * c + reduce_bytes) * dims.n_block_params + 2 * c * dims.n_root_params
        root_reduce = reduce_bytes * dims.n_root_params
    elif run.autocast and run.activation_checkpointing:
        buffers = 2 * (dims.n_block_params + head)
        cast_cache = 2 * (dims.n_layers - 1) * dims.n_block_params
    elif run.autocast:
        buffers = 2 * (dims.n_layers * dims.n_block_params + head)
    else:
        buffers = 0
    if run.optimizer == "adamw":
        step_temporaries = grads
    elif run.optimizer == "adafactor":
        step_temporaries = 2 * max(head, dims.intermediate * dims.hidden) * p
    else:
        step_temporaries = 0
    return {
        "buffers": buffers,
        "cast_cache": cast_cache,
        "root_reduce": root_reduce,
        "grad_buckets": grads if run.strategy == "ddp" else 0,
        "step_temporaries": step_temporaries,
    }


def _phase_peaks(run: _Run, parts: dict[str, int]) -> dict[str, int]:
    """The sum of what is alive in each phase: model load, forward/backward, end of backward, optimizer step."""
    dims, c = run.dims, run.c
    grads = parts["grads"]
    resident = parts["weights"] + parts["optimizer_states"] + parts["bases"] + parts["grad_buckets"]
    held_grads = grads if run.grad_accum > 1 else 0
    held = resident + parts["reference_model"] + held_grads + parts["buffers"] + parts["activations"]
    if run.activation_checkpointing:
        cast_cache = parts["cast_cache"]
        forward_end = cast_cache + c * run.tokens * dims.vocab if cast_cache else 0
        forward_backward_peak = held + max(
            parts["logits"], forward_end, parts["recomputed_block"] + grads - held_grads
        )
    else:
        forward_backward_peak = held + parts["logits"]
    backward_end_peak = 0
    if run.strategy == "fsdp2":
        backward_end_peak = resident + grads + 2 * c * dims.n_root_params + parts["root_reduce"]
    return {
        "forward_backward_peak": forward_backward_peak,
        "backward_end_peak": backward_end_peak,
        "optimizer_step_peak": resident + grads + parts["reference_model"] + parts["step_temporaries"],
        "load_peak": dims.n_params * run.p if run.strategy == "fsdp2" else 0,
    }


def estimate_worker_memory(
    dims: ModelDims,
    *,
    workers: int,
    strategy: Strategy,
    param_dtype: ParamDtype,
    mixed_precision: MixedPrecision | Literal["no"] | None,
    batch_size: int,
    max_length: int,
    activation_checkpointing: bool,
    bases_bytes_total: int = 0,
    bases_replicated_bytes: int = 0,
    optimizer: Optimizer = "adamw",
    grad_accum: int = 1,
    trainable_params: int | None = None,
    with_reference_model: bool = False,
    repeat_kv: bool = True,
) -> MemoryEstimate:
    """Estimate the tensor memory of one worker for one steady-state training step.

    ``batch_size`` is the per-worker micro-batch and ``max_length`` its padded length, so a worker sees
    ``T = batch_size * max_length`` tokens. ``p`` is the parameter dtype's size (4 or 2 bytes), ``c`` the
    compute dtype's (2 bytes under mixed precision or 16-bit parameters, else 4). ``mixed_precision="no"``
    is taken as ``None``. ``trainable_params`` (default: all) is what the optimizer updates (a LoRA run's
    adapters); ``with_reference_model`` adds the frozen copy of the base model that ``iw`` keeps;
    ``repeat_kv`` counts the keys and values of grouped-query attention at the query width, as transformers
    passes them to SDPA for a padded batch (a batch without an attention mask keeps them at ``kv``).

    The parts, their rules and the phases are the module's docstring."""
    if mixed_precision == "no":
        mixed_precision = None
    _check_inputs(
        workers, strategy, param_dtype, mixed_precision, batch_size, max_length, optimizer, grad_accum
    )
    run = _Run(
        dims=dims,
        workers=workers,
        strategy=strategy,
        param_dtype=param_dtype,
        mixed_precision=mixed_precision,
        batch_size=batch_size,
        max_length=max_length,
        activation_checkpointing=activation_checkpointing,
        bases_bytes_total=bases_bytes_total,
        bases_replicated_bytes=bases_replicated_bytes,
        optimizer=optimizer,
        grad_accum=grad_accum,
        trainable_params=dims.n_params if trainable_params is None else min(trainable_params, dims.n_params),
        with_reference_model=with_reference_model,
        repeat_kv=repeat_kv,
    )
    parts = {**_state_parts(run), **_activation_parts(run)}
    parts.update(_buffer_parts(run, parts["grads"]))
    phases = _phase_peaks(run, parts)
    return MemoryEstimate(**parts, **phases, total=max(phases.values()), **run.inputs())  # type: ignore[arg-type]

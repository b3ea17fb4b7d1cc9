"""Per-worker memory preflight for a training run: estimate, compare with the device, refuse what cannot fit.

A *worker* is one training process (one rank); ``device_bytes`` is the memory it can use: one GPU's, or its
share of a node's memory on CPU. The estimate covers the tensors of one steady-state training step (forward,
token loss, backward, optimizer step) for a Llama-style decoder (Llama, Qwen, Mistral; Gemma-3 is close) with
SDPA attention. It counts tensor bytes only: the CUDA context, the NCCL buffers, the caching allocator's
fragmentation, loading the model and scoring it after training are what the ``headroom`` of
:func:`check_fits` keeps free.

* :func:`model_dims` / :func:`model_dims_for`: the sizes of a model, with an exact parameter count taken from
  the model built on the meta device (no weights are read or allocated).
* :func:`protected_shapes` / :func:`bases_bytes`: the matrices a ``layers`` selection protects and the bytes
  of their bases (``Uk``, ``Vk``, ``Sref``, or ``W0`` at full rank).
* :func:`estimate_worker_memory`: the per-worker breakdown for a strategy (``fsdp2``, ``ddp``, ``single``), a
  parameter dtype, mixed precision, batch and activation checkpointing; :func:`estimate_train_memory` reads
  them from a :class:`~rpsft.core.config.TrainConfig`.
* :func:`check_fits`: raises :class:`MemoryPreflightError` with the per-part table and the computed fixes;
  :func:`preflight_train_memory` runs the whole check for one ``TrainConfig`` on this machine.
* :func:`measure_peak_bytes`: the peak tensor bytes of a callable, measured by torch's ``MemTracker``; the
  tests compare it with the estimate.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rpsft.core.errors import ConfigError, ModelSourceError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

if TYPE_CHECKING:
    from rpsft.core.config import TrainConfig
    from rpsft.core.selection import SelectionSpec

Strategy = Literal["fsdp2", "ddp", "single"]
ParamDtype = Literal["float32", "bfloat16", "float16"]
MixedPrecision = Literal["bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_fused", "sgd", "adafactor"]

GIB = 1 << 30
MAX_SUGGESTED_WORKERS = 64
AUTO_K_FRACTION = 0.25  # the rank fraction a k: auto spec is estimated at (the energy rule resolves it later)
BASES_DTYPE_BYTES = 4  # bases are stored in float32 for float32 / bfloat16 / float16 weights
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw_fused",
    "sgd": "sgd",
    "adafactor": "adafactor",
}


class MemoryPreflightWarning(UserWarning):
    """The memory preflight was skipped (model sizes or device memory unknown); training goes on."""


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a causal LM that its training memory depends on.

    ``n_params`` counts every parameter once (a tied embedding / output head once). ``n_block_params`` is the
    parameter count of one decoder block (the largest, if they differ) and ``n_root_params`` what is outside
    the blocks: embeddings, final norm and an untied output head. ``n_block_norms`` is the number of
    hidden-size norms in one block (2 for Llama and Qwen, 4 for Gemma-3).
    """

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    n_block_params: int
    n_root_params: int
    n_block_norms: int = 2

    @property
    def q_dim(self) -> int:
        """Width of the query projection (``n_heads * head_dim``; Gemma-3-270M's differs from ``hidden``)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection (``n_kv_heads * head_dim``)."""
        return self.n_kv_heads * self.head_dim


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: ``config.text_config`` for multimodal configs such as Gemma-3's, else ``config``."""
    return config.get_text_config(decoder=True)


def _is_hidden_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
        and isinstance(weight, torch.Tensor)
        and weight.shape == (hidden,)
    )


def model_dims(config: PretrainedConfig) -> ModelDims:
    """The :class:`ModelDims` of the causal LM that ``config`` describes (its text decoder, for Gemma-3).

    The parameters are counted on the model built on the meta device, so the count is exact for every
    architecture ``AutoModelForCausalLM`` knows; ``config`` itself is not modified."""
    from rpsft.core.fsdp import decoder_blocks

    text = copy.deepcopy(_text_config(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    n_params = sum(p.numel() for p in model.parameters())
    blocks = decoder_blocks(model)
    block_sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
    n_heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return ModelDims(
        n_params=n_params,
        n_layers=len(blocks),
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
        head_dim=int(head_dim),
        tied_embeddings=tied,
        n_block_params=max(block_sizes),
        n_root_params=n_params - sum(block_sizes),
        n_block_norms=sum(_is_hidden_norm(m, int(text.hidden_size)) for m in blocks[0].modules()),
    )


def _config_source(name_or_path: str, cache_dir: str | os.PathLike | None) -> tuple[str, dict[str, str]]:
    """Where ``AutoConfig.from_pretrained`` reads the config of a model given the way ``load_model`` takes it.

    An embedded name reads the ``config.json`` of its model cache, or else the header of its GGUF; a ``.gguf``
    path reads its header: neither is dequantized for a config. Anything else is a directory or a hub id."""
    from rpsft.core.models import EMBEDDED_MODELS, default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if name_or_path in EMBEDDED_MODELS:
        target = cache / "models" / name_or_path
        if (target / "config.json").is_file():
            return str(target), {}
        gguf = EMBEDDED_MODELS[name_or_path].locate_gguf(cache)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(
                f"model: GGUF file {path} does not exist. Fix: pass an existing .gguf path"
            )
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model: directory {path} has no config.json. Fix: pass a directory written by save_pretrained"
        )
    return str(path) if path.is_dir() else name_or_path, {}


def model_dims_for(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> ModelDims:
    """:func:`model_dims` of a model named the way :func:`rpsft.core.models.load_model` takes it: an embedded
    name (``smollm2-135m-instruct``), a local directory, a ``.gguf`` file or a hub id. Only the config is
    read; no weights are loaded. A hub id is read from the local HF cache when ``local_files_only`` (or
    ``HF_HUB_OFFLINE=1``); otherwise its ``config.json`` may be downloaded."""
    name = str(name_or_path)
    source, kwargs = _config_source(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"model: could not read the config of {name!r} ({_first_line(exc)}). Fix: pass a local directory, "
            "a .gguf file, an embedded name or a hub id whose config.json is in the local HF cache "
            f"(`huggingface-cli download {name} config.json`)"
        ) from exc
    return model_dims(config)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------- bases


_BLOCK_MATRICES = (
    ("self_attn.q_proj", lambda d: (d.q_dim, d.hidden)),
    ("self_attn.k_proj", lambda d: (d.kv_dim, d.hidden)),
    ("self_attn.v_proj", lambda d: (d.kv_dim, d.hidden)),
    ("self_attn.o_proj", lambda d: (d.hidden, d.q_dim)),
    ("mlp.gate_proj", lambda d: (d.intermediate, d.hidden)),
    ("mlp.up_proj", lambda d: (d.intermediate, d.hidden)),
    ("mlp.down_proj", lambda d: (d.hidden, d.intermediate)),
)


def protected_shapes(dims: ModelDims, layers: SelectionSpec = "all") -> dict[str, tuple[int, int]]:
    """The ``(rows, columns)`` of every matrix a ``layers`` selection picks, by Llama-style parameter name
    (``model.layers.3.self_attn.q_proj.weight``), with the rules of
    :func:`~rpsft.core.selection.select_matrices`: types, layer range, regex, and a tied output head once
    (as the embedding when both are selected)."""
    from rpsft.core.selection import name_filter

    names: dict[str, tuple[int, int]] = {"model.embed_tokens.weight": (dims.vocab, dims.hidden)}
    for index in range(dims.n_layers):
        for path, shape in _BLOCK_MATRICES:
            names[f"model.layers.{index}.{path}.weight"] = shape(dims)
    names["lm_head.weight"] = (dims.vocab, dims.hidden)
    picks = name_filter(layers, dims.n_layers)
    selected = {name: shape for name, shape in names.items() if picks(name)}
    if dims.tied_embeddings and "model.embed_tokens.weight" in selected:
        selected.pop("lm_head.weight", None)  # one parameter: selected once, under its first name
    return selected


def bases_bytes(
    shapes: dict[str, tuple[int, int]], k: int | float, *, w0_bytes: int = BASES_DTYPE_BYTES
) -> tuple[int, int]:
    """``(total, replicated)`` bytes of the bases of ``shapes`` at ``k`` (an int rank or a rank fraction,
    resolved per matrix by :func:`rpsft.core.bases.resolve_k`).

    A matrix ``m x n`` at ``k < min(m, n)`` keeps ``Uk`` (``m x k``), ``Vk`` (``n x k``) and ``Sref``
    (``k x k``) in float32; at full rank it keeps ``W0`` (``m x n``) with ``w0_bytes`` per element (the
    weights' dtype in one process, float32 in FSDP2's row slices). ``replicated`` is what every FSDP2 rank
    holds whole (``Vk`` and ``Sref``, :mod:`rpsft.core.sharded_penalty`); the rest (``Uk``, ``W0``) is
    sharded by rows."""
    from rpsft.core.bases import resolve_k

    total = replicated = 0
    for shape in shapes.values():
        rank = resolve_k(k, shape)
        if rank == 0:
            continue
        rows, cols = shape
        if rank == min(shape):
            total += rows * cols * w0_bytes
        else:
            whole = (cols * rank + rank * rank) * BASES_DTYPE_BYTES
            total += rows * rank * BASES_DTYPE_BYTES + whole
            replicated += whole
    return total, replicated


# ---------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-worker memory of one training step, in bytes, with the inputs it was estimated for.

    The parts (:meth:`breakdown`) are each alive in some phases of the run; ``load_peak``,
    ``forward_backward_peak``, ``backward_end_peak`` and ``optimizer_step_peak`` are the phases' sums (see
    :func:`estimate_worker_memory`) and ``total`` is the largest of them."""

    weights: int
    grads: int
    optimizer_states: int
    bases: int
    reference_model: int
    activations: int
    recomputed_block: int
    logits: int
    buffers: int
    cast_cache: int
    root_reduce: int
    grad_buckets: int
    step_temporaries: int
    forward_backward_peak: int
    backward_end_peak: int
    optimizer_step_peak: int
    load_peak: int
    total: int
    dims: ModelDims
    workers: int
    strategy: Strategy
    param_dtype: ParamDtype
    mixed_precision: MixedPrecision | None
    batch_size: int
    max_length: int
    activation_checkpointing: bool
    bases_bytes_total: int
    bases_replicated_bytes: int
    optimizer: Optimizer
    grad_accum: int
    trainable_params: int
    with_reference_model: bool
    repeat_kv: bool

    PARTS = (
        "weights",
        "grads",
        "optimizer_states",
        "bases",
        "reference_model",
        "activations",
        "recomputed_block",
        "logits",
        "buffers",
        "cast_cache",
        "root_reduce",
        "grad_buckets",
        "step_temporaries",
    )
    PHASES = (
        ("model load", "load_peak"),
        ("forward/backward peak", "forward_backward_peak"),
        ("end of backward", "backward_end_peak"),
        ("optimizer step", "optimizer_step_peak"),
    )

    def breakdown(self) -> dict[str, int]:
        """The byte counts of the parts by name, ``total`` last."""
        return {name: getattr(self, name) for name in (*self.PARTS, "total")}

    def describe(self) -> str:
        """The inputs in one line, named as the config names them."""
        if self.strategy == "single":
            where = "resources.workers 1 (one process)"
        else:
            where = f"resources.workers {self.workers}, resources.strategy {self.strategy}"
        accum = f" (train.grad_accum {self.grad_accum})" if self.grad_accum > 1 else ""
        return (
            f"{where}, train.dtype {self.param_dtype}, train.mixed_precision {self.mixed_precision or 'no'}, "
            f"train.batch_size {self.batch_size}{accum} x train.max_length {self.max_length}, "
            f"train.activation_checkpointing {str(self.activation_checkpointing).lower()}"
        )

    def table(self) -> str:
        """The non-zero parts and the phase peaks in GiB, one per line (what the preflight prints)."""
        parts = [(name, value) for name, value in self.breakdown().items() if value and name != "total"]
        phases = [(label, getattr(self, field)) for label, field in self.PHASES if getattr(self, field)]
        last = ("total (largest phase)", self.total)
        width = max(len(name) for name, _ in [*parts, *phases, last]) + 2
        lines = [f"  {'part':<{width}}{'GiB':>8}"]
        lines += [f"  {name:<{width}}{value / GIB:>8.2f}" for name, value in parts]
        lines.append("  " + "-" * (width + 8))
        lines += [f"  {name:<{width}}{value / GIB:>8.2f}" for name, value in [*phases, last]]
        return "\n".join(lines)


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
    if param_dtype not in _DTYPE_BYTES:
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
    if mixed_precision == "no":
        mixed_precision = None
    _check_inputs(
        workers, strategy, param_dtype, mixed_precision, batch_size, max_length, optimizer, grad_accum
    )
    trainable = dims.n_params if trainable_params is None else min(trainable_params, dims.n_params)
    p = _DTYPE_BYTES[param_dtype]
    low_precision = mixed_precision is not None or param_dtype != "float32"
    c = 2 if low_precision else 4
    shards = workers if strategy == "fsdp2" else 1

    weights = math.ceil(dims.n_params * p / shards)
    grads = math.ceil(trainable * p / shards)
    optimizer_states = 2 * grads if optimizer in ("adamw", "adamw_fused") else 0
    sharded_bases = max(0, bases_bytes_total - bases_replicated_bytes)
    bases = math.ceil(sharded_bases / shards) + (bases_bytes_total - sharded_bases)
    reference_model = dims.n_params * p if with_reference_model else 0

    autocast = strategy != "fsdp2" and mixed_precision is not None and param_dtype == "float32"
    regime = "autocast" if autocast else ("bfloat16" if low_precision else "float32")
    per_block, final_norm, block_input = _activation_bytes_per_token(dims, regime, repeat_kv)
    tokens = batch_size * max_length
    if activation_checkpointing:
        activations = tokens * (dims.n_layers * block_input + final_norm)
        recomputed_block = tokens * per_block
    else:
        activations = tokens * (dims.n_layers * per_block + final_norm)
        recomputed_block = 0
    logits = (12 + (2 * c if with_reference_model else 0)) * tokens * dims.vocab

    head = dims.vocab * dims.hidden
    cast_cache = root_reduce = 0
    if strategy == "fsdp2":
        reduce_bytes = 4 if mixed_precision == "bf16" else p
        buffers = (3 * c + reduce_bytes) * dims.n_block_params + 2 * c * dims.n_root_params
        root_reduce = reduce_bytes * dims.n_root_params
    elif autocast and activation_checkpointing:
        buffers = 2 * (dims.n_block_params + head)
        cast_cache = 2 * (dims.n_layers - 1) * dims.n_block_params
    elif autocast:
        buffers = 2 * (dims.n_layers * dims.n_block_params + head)
    else:
        buffers = 0
    grad_buckets = grads if strategy == "ddp" else 0
    if optimizer == "adamw":
        step_temporaries = grads
    elif optimizer == "adafactor":
        step_temporaries = 2 * max(head, dims.intermediate * dims.hidden) * p
    else:
        step_temporaries = 0

    held_grads = grads if grad_accum > 1 else 0
    held = (
        weights
        + optimizer_states
        + bases
        + reference_model
        + grad_buckets
        + held_grads
        + buffers
        + activations
    )
    if activation_checkpointing:
        forward_end = cast_cache + c * tokens * dims.vocab if cast_cache else 0
        forward_backward_peak = held + max(logits, forward_end, recomputed_block + grads - held_grads)
    else:
        forward_backward_peak = held + logits
    backward_end_peak = 0
    if strategy == "fsdp2":
        backward_end_peak = (
            weights
            + grads
            + optimizer_states
            + bases
            + grad_buckets
            + 2 * c * dims.n_root_params
            + root_reduce
        )
    optimizer_step_peak = (
        weights + grads + optimizer_states + bases + reference_model + grad_buckets + step_temporaries
    )
    load_peak = dims.n_params * p if strategy == "fsdp2" else 0
    return MemoryEstimate(
        weights=weights,
        grads=grads,
        optimizer_states=optimizer_states,
        bases=bases,
        reference_model=reference_model,
        activations=activations,
        recomputed_block=recomputed_block,
        logits=logits,
        buffers=buffers,
        cast_cache=cast_cache,
        root_reduce=root_reduce,
        grad_buckets=grad_buckets,
        step_temporaries=step_temporaries,
        forward_backward_peak=forward_backward_peak,
        backward_end_peak=backward_end_peak,
        optimizer_step_peak=optimizer_step_peak,
        load_peak=load_peak,
        total=max(load_peak, forward_backward_peak, backward_end_peak, optimizer_step_peak),
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
        trainable_params=trainable,
        with_reference_model=with_reference_model,
        repeat_kv=repeat_kv,
    )


def _planned_precision(config: TrainConfig) -> str:
    """``mixed_precision`` as the run will resolve it: ``auto`` is bf16 on GPUs, and on CPUs what this
    machine's CPU supports natively (:func:`rpsft.core.precision.resolve_mixed_precision`)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if config.resources.gpus_per_process > 0:
        return "bf16"
    from rpsft.core.precision import resolve_mixed_precision

    return resolve_mixed_precision("auto", "cpu")


def estimate_train_memory(
    config: TrainConfig, dims: ModelDims, *, auto_k: int | float = AUTO_K_FRACTION
) -> MemoryEstimate:
    """:func:`estimate_worker_memory` for one training run: the strategy from ``resources`` (``workers: 1`` is
    ``single``), ``dtype``, ``mixed_precision``, ``batch_size`` (per worker), ``grad_accum``, ``max_length``,
    ``activation_checkpointing`` and ``optimizer``; the bases of the ``layers`` selection at the method's
    ``k`` (a ``k: auto`` counts as ``auto_k``, the energy rule resolves it later); a LoRA method trains
    ``lora_r (m + n)`` parameters per selected matrix; ``iw`` keeps a reference model."""
    from rpsft.core.rank_rule import is_auto_k

    resources = config.resources
    strategy: Strategy = resources.strategy if resources.distributed else "single"
    spec = config.spec
    k = config.effective_k
    if is_auto_k(k):
        k = auto_k
    shapes = protected_shapes(dims, config.layers)
    w0_bytes = BASES_DTYPE_BYTES if strategy == "fsdp2" else _DTYPE_BYTES[config.dtype]
    total, replicated = bases_bytes(shapes, k, w0_bytes=w0_bytes) if spec.uses_bases and k else (0, 0)
    trainable = None
    if spec.adapter == "lora":
        trainable = sum(config.lora_r * (rows + cols) for rows, cols in shapes.values())
    return estimate_worker_memory(
        dims,
        workers=resources.workers,
        strategy=strategy,
        param_dtype=config.dtype,
        mixed_precision=_planned_precision(config),
        batch_size=config.batch_size,
        max_length=config.max_length,
        activation_checkpointing=config.activation_checkpointing,
        bases_bytes_total=total,
        bases_replicated_bytes=replicated,
        optimizer=_OPTIMIZERS.get(config.optimizer, config.optimizer),  # type: ignore[arg-type]
        grad_accum=config.grad_accum,
        trainable_params=trainable,
        with_reference_model=spec.reference_model,
    )


# -------------------------------------------------------------------------------------------- fixes


@dataclass(frozen=True)
class MemoryFix:
    """A config change, as ``{config field: new value}``, with the estimate it gives and whether that fits."""

    changes: dict[str, str]
    estimate: MemoryEstimate
    fits: bool

    def describe(self) -> str:
        """``field: value, ...`` as one line."""
        return ", ".join(f"{field}: {value}" for field, value in self.changes.items())


_ESTIMATE_INPUTS = (
    "workers",
    "strategy",
    "param_dtype",
    "mixed_precision",
    "batch_size",
    "max_length",
    "activation_checkpointing",
    "bases_bytes_total",
    "bases_replicated_bytes",
    "optimizer",
    "grad_accum",
    "trainable_params",
    "with_reference_model",
    "repeat_kv",
)


def _reestimate(estimate: MemoryEstimate, **changes: object) -> MemoryEstimate:
    inputs = {name: getattr(estimate, name) for name in _ESTIMATE_INPUTS}
    inputs.update(changes)
    return estimate_worker_memory(estimate.dims, **inputs)  # type: ignore[arg-type]


def _describe_changes(estimate: MemoryEstimate, changes: dict[str, Any], gpu: bool) -> dict[str, str]:
    described: dict[str, str] = {}
    if "workers" in changes:
        described["resources.workers"] = str(changes["workers"])
        if estimate.strategy != "fsdp2":
            described["resources.strategy"] = "fsdp2"
        if gpu and estimate.workers == 1:
            described["resources.gpus_per_worker"] = "1"
            described["resources.gpus"] = "0"
    if "mixed_precision" in changes:
        described["train.mixed_precision"] = str(changes["mixed_precision"])
    if "param_dtype" in changes:
        described["train.dtype"] = str(changes["param_dtype"])
    if "activation_checkpointing" in changes:
        described["train.activation_checkpointing"] = str(changes["activation_checkpointing"]).lower()
    if "batch_size" in changes:
        described["train.batch_size"] = str(changes["batch_size"])
        if changes.get("grad_accum", estimate.grad_accum) != estimate.grad_accum:
            described["train.grad_accum"] = f"{changes['grad_accum']} (the same sequences per step)"
    return described


def _fix(estimate: MemoryEstimate, budget: int, gpu: bool, changes: dict[str, Any]) -> MemoryFix:
    changed = _reestimate(estimate, **changes)
    return MemoryFix(_describe_changes(estimate, changes, gpu), changed, changed.total <= budget)


def _batch_changes(estimate: MemoryEstimate, size: int) -> dict[str, int]:
    """A smaller ``batch_size`` with ``grad_accum`` raised to keep the sequences of an optimizer step."""
    sequences = estimate.batch_size * estimate.grad_accum
    return {"batch_size": size, "grad_accum": max(estimate.grad_accum, math.ceil(sequences / size))}


def _fewest_fsdp2_workers(estimate: MemoryEstimate, budget: int) -> int | None:
    """The smallest FSDP2 worker count up to 64, above the current one, at which ``estimate`` fits."""
    start = estimate.workers + 1 if estimate.strategy == "fsdp2" else 2
    for workers in range(start, MAX_SUGGESTED_WORKERS + 1):
        if _reestimate(estimate, strategy="fsdp2", workers=workers).total <= budget:
            return workers
    return None


def _largest_batch(estimate: MemoryEstimate, budget: int) -> int | None:
    """The largest batch size below the current one at which ``estimate`` fits (``grad_accum`` raised to
    keep the sequences per step), by bisection: the estimate grows with the batch."""
    low, high = 0, estimate.batch_size - 1  # the answer lies in [low, high]; 0: none fits
    while low < high:
        middle = (low + high + 1) // 2
        if _reestimate(estimate, **_batch_changes(estimate, middle)).total <= budget:
            low = middle
        else:
            high = middle - 1
    return low or None


def suggest_fixes(
    estimate: MemoryEstimate, budget: int, *, more_workers: bool = True, gpu: bool = True
) -> list[MemoryFix]:
    """The config changes that reduce ``estimate``, each applied alone, and one combination when none fits alone.

    Alone: the smallest FSDP2 ``resources.workers`` up to 64 that fits (if any, and ``more_workers``);
    ``train.mixed_precision: bf16`` and ``train.dtype: bfloat16`` when the run is in float32 without them;
    ``train.activation_checkpointing: true`` when off; the largest smaller ``train.batch_size`` that fits
    (if any; ``train.grad_accum`` raised to keep the sequences per step). A change that does not lower the
    estimate is left out. When none of these fits, the combination of bf16 mixed precision, activation
    checkpointing and the fewest FSDP2 workers is added, with the largest batch size, and bfloat16
    parameters if that is still not enough. ``gpu``: a change to more workers names
    ``resources.gpus_per_worker``."""
    alone: list[dict[str, Any]] = []
    if more_workers:
        workers = _fewest_fsdp2_workers(estimate, budget)
        if workers is not None:
            alone.append({"strategy": "fsdp2", "workers": workers})
    if estimate.mixed_precision is None and estimate.param_dtype == "float32":
        alone.append({"mixed_precision": "bf16"})
    if estimate.param_dtype == "float32":
        alone.append({"param_dtype": "bfloat16"})
    if not estimate.activation_checkpointing:
        alone.append({"activation_checkpointing": True})
    batch = _largest_batch(estimate, budget)
    if batch is not None:
        alone.append(_batch_changes(estimate, batch))
    fixes = [_fix(estimate, budget, gpu, changes) for changes in alone]
    fixes = [fix for fix in fixes if fix.estimate.total < estimate.total]
    if any(fix.fits for fix in fixes):
        return fixes

    toggles: dict[str, Any] = {}
    if estimate.mixed_precision is None and estimate.param_dtype == "float32":
        toggles["mixed_precision"] = "bf16"
    if not estimate.activation_checkpointing:
        toggles["activation_checkpointing"] = True
    attempts = [toggles]
    if estimate.param_dtype == "float32":
        attempts.append({**toggles, "param_dtype": "bfloat16"})
    combined: MemoryFix | None = None
    for attempt in attempts:
        changes = dict(attempt)
        if more_workers:
            at_batch_1 = _reestimate(estimate, **changes, **_batch_changes(estimate, 1))
            if at_batch_1.total > budget:
                workers = _fewest_fsdp2_workers(at_batch_1, budget)
                if workers is None and at_batch_1.workers < MAX_SUGGESTED_WORKERS:
                    workers = MAX_SUGGESTED_WORKERS
                if workers is not None:
                    changes.update(strategy="fsdp2", workers=workers)
        trial = _reestimate(estimate, **changes)
        if trial.total > budget and trial.batch_size > 1:
            changes.update(_batch_changes(trial, _largest_batch(trial, budget) or 1))
        combined = _fix(estimate, budget, gpu, changes)
        if combined.fits:
            break
    if (
        combined is not None
        and len(set(changes) - {"strategy", "grad_accum"}) > 1
        and combined.estimate.total < estimate.total
        and all(combined.changes != fix.changes for fix in fixes)
    ):
        fixes.append(combined)
    return fixes


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


class MemoryPreflightError(ConfigError):
    """A training config whose estimated per-worker memory exceeds the usable memory of its device.

    ``estimate``, ``device_bytes``, ``budget`` (``headroom * device_bytes``) and ``fixes`` hold the numbers
    the message shows; ``device`` names the memory (``GPU memory``, ``node memory per process``)."""

    def __init__(
        self,
        estimate: MemoryEstimate,
        device_bytes: int,
        budget: int,
        fixes: list[MemoryFix],
        device: str = "GPU memory",
        more_workers: bool = True,
        subject: str = "a worker",
    ):
        self.estimate, self.device_bytes, self.budget, self.fixes = estimate, device_bytes, budget, fixes
        self.device = device
        lines = [
            f"memory preflight: {subject} needs an estimated {_gib(estimate.total)} but {_gib(budget)} is usable "
            f"({budget / device_bytes:.0%} of {_gib(device_bytes)} {device}), for {estimate.describe()}.",
            "Per worker:",
            estimate.table(),
        ]
        if fixes:
            lines.append("Fix (the estimated total per worker with each change):")
            lines += [
                f"  {fix.describe()} -> {_gib(fix.estimate.total)}{' (fits)' if fix.fits else ' (not enough)'}"
                for fix in fixes
            ]
        if not any(fix.fits for fix in fixes):
            scope = f"up to {MAX_SUGGESTED_WORKERS} FSDP2 workers" if more_workers else "on this memory"
            lines.append(
                f"  {'none of these fits' if fixes else 'no config change fits'} {scope}: shorten "
                "train.max_length, or use a smaller model or a device with more memory"
            )
        super().__init__("\n".join(lines))


def check_fits(
    estimate: MemoryEstimate,
    device_bytes: int,
    *,
    headroom: float = 0.9,
    device: str = "GPU memory",
    more_workers: bool = True,
    subject: str = "a worker",
) -> None:
    """Raise :class:`MemoryPreflightError` when ``estimate.total > headroom * device_bytes``.

    The headroom keeps room for what the estimate leaves out (CUDA context, NCCL, allocator fragmentation).
    ``device`` names the memory in the message, ``subject`` what needs it; a change to more workers is
    suggested when ``more_workers`` (each worker with a GPU of its own when ``device`` is a GPU's memory)."""
    if device_bytes <= 0:
        raise ConfigError(f"device memory: {device_bytes} bytes. Fix: the device's total memory in bytes")
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom: {headroom}. Fix: a fraction in (0, 1]")
    budget = int(headroom * device_bytes)
    if estimate.total > budget:
        gpu = device.startswith("GPU")
        fixes = suggest_fixes(estimate, budget, more_workers=more_workers, gpu=gpu)
        raise MemoryPreflightError(estimate, device_bytes, budget, fixes, device, more_workers, subject)


def local_memory_bytes() -> int:
    """Memory a new process on this machine can use: the available memory (``psutil``), else the total."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def preflight_train_memory(
    config: TrainConfig,
    device_bytes: int | None = None,
    *,
    dims: ModelDims | None = None,
    headroom: float = 0.9,
) -> MemoryEstimate | None:
    """The memory preflight of one training run (``rpsft train``), before the model is loaded.

    The model's sizes come from its config only (:func:`model_dims_for`, offline: an embedded name, a local
    directory, a ``.gguf`` file or a hub id in the local HF cache); when they cannot be read, a
    :class:`MemoryPreflightWarning` says so and ``None`` is returned. ``device_bytes`` defaults to the
    memory of GPU 0 when CUDA is available (where :func:`rpsft.core.train.train` runs), else to this
    machine's available memory shared by ``resources.workers`` processes. Returns the estimate when it
    fits; raises :class:`MemoryPreflightError` (a ``ConfigError``) with the numbers and the fixes when not."""
    if dims is None:
        try:
            dims = model_dims_for(config.model, cache_dir=config.cache_dir, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  # the preflight never stops a run it cannot size
            warnings.warn(
                f"memory preflight skipped: the sizes of model {config.model!r} are not available offline "
                f"({_first_line(exc)})",
                MemoryPreflightWarning,
                stacklevel=2,
            )
            return None
    estimate = estimate_train_memory(config, dims)
    device = "GPU memory"
    if device_bytes is None:
        if torch.cuda.is_available():
            device_bytes = int(torch.cuda.get_device_properties(0).total_memory)
        else:
            workers = config.resources.workers
            device_bytes = local_memory_bytes() // workers
            device = "memory per process" if workers == 1 else f"memory per process ({workers} processes)"
    # more CPU processes on this machine share its memory: more workers only help with a GPU each
    check_fits(estimate, device_bytes, headroom=headroom, device=device, more_workers=device == "GPU memory")
    return estimate


def measure_peak_bytes(
    fn: Callable[[], object],
    *external: nn.Module | torch.optim.Optimizer | torch.Tensor,
    device: torch.device | str | None = None,
) -> int:
    """Run ``fn()`` under torch's ``MemTracker`` and return the peak tensor bytes on ``device``.

    ``external`` are the modules, optimizers and tensors made before the call (the model, the optimizer with
    its states, the batch): they are registered with ``track_external`` so that the peak includes them;
    tensors made inside ``fn`` are tracked anyway. With ``device=None`` the peak of the device that peaked
    highest is returned (the only one, on a CPU or one-GPU run)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*external)
    with tracker:
        fn()
    peaks = {dev: snap.get("Total", 0) for dev, snap in tracker.get_tracker_snapshot("peak").items()}
    if device is not None:
        return int(peaks.get(torch.device(device), 0))
    return int(max(peaks.values(), default=0))


__all__ = [
    "AUTO_K_FRACTION",
    "MemoryEstimate",
    "MemoryFix",
    "MemoryPreflightError",
    "MemoryPreflightWarning",
    "ModelDims",
    "bases_bytes",
    "check_fits",
    "estimate_train_memory",
    "estimate_worker_memory",
    "local_memory_bytes",
    "measure_peak_bytes",
    "model_dims",
    "model_dims_for",
    "preflight_train_memory",
    "protected_shapes",
    "suggest_fixes",
]

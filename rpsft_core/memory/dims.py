"""The sizes a model's training memory depends on: its dimensions, read from its config alone, and the matrices
a ``layers`` selection protects with the bytes of their bases."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rpsft.core.errors import ModelSourceError
from rpsft.core.memory.report import first_line
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

if TYPE_CHECKING:
    from rpsft.core.selection import SelectionSpec

BASES_DTYPE_BYTES = 4  # bases are stored in float32 for float32 / bfloat16 / float16 weights


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


def looks_local(name: str) -> bool:
    """Whether a model given as ``name`` is a path on this machine rather than a hub id: absolute, ``./``,
    ``../``, ``~``, a ``.gguf`` file, or under a folder that exists here."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.endswith(".gguf"):
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.is_dir()


def refuse_missing_local_model(name: str) -> None:
    """Raise :class:`ModelSourceError` for a model given as a local path that does not exist."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise ModelSourceError(
            f"model: no such directory or file {name}. Fix: pass an existing model directory (written by "
            "save_pretrained), a .gguf file, an embedded name (`rpsft models` lists them) or a hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct"
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
    refuse_missing_local_model(name_or_path)
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
        if looks_local(name):
            fix = f"Fix: check that {name} holds a transformers config.json (written by save_pretrained)"
        else:
            fix = (
                "Fix: pass a local directory, a .gguf file, an embedded name or a hub id whose config.json is in "
                f"the local HF cache (`huggingface-cli download {name} config.json`)"
            )
        raise ModelSourceError(f"model: could not read the config of {name!r} ({first_line(exc)}). {fix}") from exc
    return model_dims(config)


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
    holds whole (``Vk`` and ``Sref``, :mod:`rpsft.core.row_shards`); the rest (``Uk``, ``W0``) is
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


"""Parts of a model by parameter name: naming, weight and linear-module lookup, eval/grad modes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TYPE_RE = re.compile(r"(?:^|\.)(q|k|v|o|gate|up|down)_proj\.weight$")
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def layer_index(name: str) -> int | None:
    """Decoder block index of a parameter name (``model.layers.3.self_attn.q_proj.weight`` -> 3)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def matrix_type(name: str) -> str:
    """``q``/``k``/``v``/``o``/``gate``/``up``/``down`` for block matrices, else the last name part."""
    match = _TYPE_RE.search(name)
    if match:
        return match.group(1)
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] == "weight" else parts[-1]


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


WeightSource = nn.Module | Mapping[str, Tensor]


def named_weights(source: WeightSource) -> dict[str, Tensor]:
    """``{name: tensor}`` of a model (parameters, tied ones under every name) or a state-dict-like mapping."""
    if isinstance(source, nn.Module):
        return {name: param for name, param in source.named_parameters(remove_duplicate=False)}
    return dict(source)


def resolve_names(base: WeightSource, selection) -> list[str]:
    """Parameter names from a selection: a preset/spec (needs a model), a selection dict, or names."""
    from rpsft.core.selection import LayerSpec, select_matrices

    if selection is None:
        selection = "all"
    if isinstance(selection, str | LayerSpec) or (
        isinstance(selection, dict) and not any(isinstance(v, Tensor) for v in selection.values())
    ):
        if not isinstance(base, nn.Module):
            raise TypeError(
                "selection: a preset or spec needs the base model (an nn.Module). Fix: pass a model, "
                "or pass the parameter names"
            )
        return list(select_matrices(base, selection))
    if isinstance(selection, Mapping):
        return list(selection)
    if isinstance(selection, Iterable):
        return list(selection)
    raise TypeError(f"selection: expected a preset, spec, dict or names, got {type(selection).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no dropout) and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def grad_enabled_for(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Make ``params`` require grad (restoring their flags afterwards), with autograd switched on."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def linear_module(model: nn.Module, param_name: str) -> nn.Module:
    """The module owning ``param_name`` (``...q_proj.weight`` -> the ``q_proj`` Linear); must be linear."""
    if not param_name.endswith(".weight"):
        raise ValueError(f"matrix: {param_name!r} is not a '.weight' parameter name")
    module_name = param_name[: -len(".weight")]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise KeyError(f"matrix: the model has no module {module_name!r} (from {param_name!r})") from None
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"matrix: {module_name!r} is a {type(module).__name__}, not an nn.Linear (Y = X W^T + b); "
            "per-sample gradients need a linear layer. Fix: pick a *_proj matrix"
        )
    return module


def to_float64_cpu(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)

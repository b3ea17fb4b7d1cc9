"""Which weight matrices RPSFT protects: by type, by layer range, by regex, or by a named preset.

A selection is a ``dict[str, Parameter]`` keyed by the parameter's name in the (unwrapped) model, e.g.
``model.layers.3.self_attn.q_proj.weight``. It works on Llama- and Gemma-family decoder models (any model whose
blocks live under ``...layers.<i>.`` and use the ``*_proj`` names).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rpsft.core.errors import ConfigError
from torch import nn

MatrixType = Literal["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"]
BLOCK_TYPES: tuple[MatrixType, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_TYPES: tuple[MatrixType, ...] = ("q", "k", "v", "o")
MLP_TYPES: tuple[MatrixType, ...] = ("gate", "up", "down")
_TYPE_PATTERN = {
    "q": r"\.q_proj\.weight$",
    "k": r"\.k_proj\.weight$",
    "v": r"\.v_proj\.weight$",
    "o": r"\.o_proj\.weight$",
    "gate": r"\.gate_proj\.weight$",
    "up": r"\.up_proj\.weight$",
    "down": r"\.down_proj\.weight$",
    "embed": r"embed_tokens\.weight$",
    "lm_head": r"(^|\.)lm_head\.weight$",
}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class LayerSpec(BaseModel):
    """A selection of weight matrices.

    ``layers`` is a half-open range ``"start:end"`` over decoder blocks; each bound is an int (negative counts
    from the end) or a fraction of the number of blocks (``"0:0.33"`` = the first third). ``regex`` further
    filters parameter names with ``re.search``. Embeddings and ``lm_head`` are only selected when listed in
    ``types``.
    """

    model_config = ConfigDict(extra="forbid")

    types: list[MatrixType] = Field(default_factory=lambda: list(BLOCK_TYPES), min_length=1)
    layers: str | None = None
    regex: str | None = None

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split(":")
        if len(parts) != 2:
            raise ValueError(f"layers: {value!r} is not a 'start:end' range. Fix: e.g. '0:4', '-4:', '0:0.5'")
        for part in parts:
            if part.strip():
                _parse_bound(part, value)
        return value

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex: {value!r} does not compile ({exc})") from exc
        return value

    def layer_range(self, num_layers: int) -> range:
        if self.layers is None:
            return range(num_layers)
        start_text, end_text = self.layers.split(":")
        start = _resolve_bound(start_text, num_layers, default=0)
        end = _resolve_bound(end_text, num_layers, default=num_layers)
        return range(max(start, 0), min(end, num_layers))


def _parse_bound(text: str, whole: str) -> float | int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"layers: bound {text!r} in {whole!r} is not an int or a fraction") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"layers: fractional bound {text!r} in {whole!r} must lie in [0, 1]")
    return value


def _resolve_bound(text: str, num_layers: int, default: int) -> int:
    if not text.strip():
        return default
    value = _parse_bound(text, text)
    if isinstance(value, float):
        return round(value * num_layers)
    return value + num_layers if value < 0 else value


PRESETS: dict[str, LayerSpec] = {
    "all": LayerSpec(),
    "attn": LayerSpec(types=list(ATTN_TYPES)),
    "mlp": LayerSpec(types=list(MLP_TYPES)),
    "early-attn": LayerSpec(types=list(ATTN_TYPES), layers="0:0.34"),
    "late-attn": LayerSpec(types=list(ATTN_TYPES), layers="0.66:"),
    "early": LayerSpec(layers="0:0.34"),
    "late": LayerSpec(layers="0.66:"),
    "all+embed": LayerSpec(types=[*BLOCK_TYPES, "embed", "lm_head"]),
}

SelectionSpec = Union[str, LayerSpec, dict]


def resolve_spec(spec: SelectionSpec) -> LayerSpec:
    """A preset name, a dict, or a LayerSpec -> LayerSpec (errors name the field and list the presets)."""
    if isinstance(spec, LayerSpec):
        return spec
    if isinstance(spec, dict):
        return LayerSpec.model_validate(spec)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(
                f"layers: unknown preset {spec!r}. Fix: use one of {', '.join(PRESETS)} or a spec "
                "{types: [...], layers: 'start:end', regex: ...}"
            )
        return PRESETS[spec]
    raise TypeError(f"layers: expected a preset name, a dict or a LayerSpec, got {type(spec).__name__}")


def num_decoder_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "num_hidden_layers", None):
            return int(text_config.num_hidden_layers)
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))}
    return max(indices) + 1 if indices else 0


def name_filter(spec: SelectionSpec, num_layers: int) -> Callable[[str], bool]:
    """Whether a parameter name is picked by ``spec`` in a model of ``num_layers`` decoder layers: its type
    pattern, its layer range (names outside the blocks have none) and its regex; the rule of
    :func:`select_matrices`, also for names without a model (the memory preflight)."""
    layer_spec = resolve_spec(spec)
    allowed_layers = set(layer_spec.layer_range(num_layers))
    type_patterns = [re.compile(_TYPE_PATTERN[t]) for t in layer_spec.types]
    regex = re.compile(layer_spec.regex) if layer_spec.regex else None

    def picks(name: str) -> bool:
        if not any(p.search(name) for p in type_patterns):
            return False
        layer_match = _LAYER_INDEX.search(name)
        if layer_match and int(layer_match.group(1)) not in allowed_layers:
            return False
        return regex is None or bool(regex.search(name))

    return picks


def select_matrices(model: nn.Module, spec: SelectionSpec = "all") -> dict[str, nn.Parameter]:
    """Return the selected 2-D weight matrices of ``model`` as ``{parameter name: Parameter}``.

    Tied parameters (embeddings shared with ``lm_head``) appear once. Raises ``ValueError`` naming the
    ``layers`` field when nothing matches.
    """
    layer_spec = resolve_spec(spec)
    num_layers = num_decoder_layers(model)
    picks = name_filter(layer_spec, num_layers)
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.ndim != 2 or id(param) in seen or not picks(name):
            continue
        selected[name] = param
        seen.add(id(param))
    if not selected:
        raise ConfigError(
            f"layers: the selection {layer_spec.model_dump(exclude_none=True)} matches no weight matrix of "
            f"{type(model).__name__} ({num_layers} decoder layers). Fix: widen types/layers/regex or use a preset "
            f"({', '.join(PRESETS)})"
        )
    return selected

"""Shared helpers of the RPSFT benchmarks: architecture shapes, devices, timing, tables, JSON.

Architectures are built from ``transformers`` configs in code (no downloads). Their matrix shapes and counts
come from a model instantiated on the ``meta`` device and :func:`rpsft.core.selection.select_matrices`, so they
are exactly the matrices RPSFT would protect.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ARCHS = ("smollm2", "llama3-8b", "qwen2.5-3b")
DEFAULT_K = {"smollm2": 64, "llama3-8b": 768, "qwen2.5-3b": 768}
_TYPE_OF = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def arch_config(name: str, *, layers: int | None = None, vocab: int | None = None):
    """A ``transformers`` config with the real hidden / intermediate / head sizes of ``name``."""
    from transformers import LlamaConfig, Qwen2Config

    if name == "smollm2":  # SmolLM2-135M(-Instruct)
        cfg = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            tie_word_embeddings=True, rms_norm_eps=1e-5,
        )
    elif name == "llama3-8b":  # Llama-3.1-8B
        cfg = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
        )
    elif name == "qwen2.5-3b":  # Qwen2.5-3B
        cfg = Qwen2Config(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, rms_norm_eps=1e-6,
        )
    else:
        raise ValueError(f"--shapes: unknown architecture {name!r}; use one of {', '.join(ARCHS)}")
    if layers is not None:
        cfg.num_hidden_layers = int(layers)
        if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
            cfg.layer_types = cfg.layer_types[: int(layers)]
    if vocab is not None:
        cfg.vocab_size = int(vocab)
    return cfg


def matrix_shapes(cfg, selection: str = "all") -> OrderedDict[tuple[int, int], dict[str, Any]]:
    """``{(m, n): {"count": c, "types": [...], "example": name}}`` of the selected matrices of ``cfg``."""
    from rpsft.core.selection import select_matrices
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
    for name, param in select_matrices(model, selection).items():
        entry = shapes.setdefault(tuple(param.shape), {"count": 0, "types": [], "example": name})
        entry["count"] += 1
        match = _TYPE_OF.search(name)
        kind = match.group(1) if match else name
        if kind not in entry["types"]:
            entry["types"].append(kind)
    return shapes


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, result), synchronizing the device around it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return env


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) < 10 ** -(digits - 1):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], digits: int = 3) -> str:
    """A markdown table with aligned columns. ``columns`` is ``[(key, header), ...]``."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([fmt(row.get(key), digits) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [
        all(_looks_numeric(line[i]) for line in cells[1:]) and len(cells) > 1 for i in range(len(columns))
    ]

    def render(line: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric))
    return "\n".join([render(cells[0]), sep + "|"] + [render(line) for line in cells[1:]])


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?x?%?", text))


def write_json(path: str | os.PathLike | None, payload: dict[str, Any], quiet: bool = False) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    if not quiet:
        print(f"\nwrote {path}")


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20

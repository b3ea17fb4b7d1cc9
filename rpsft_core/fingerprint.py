"""The one tensor fingerprint: sha256 over labelled tensors and their bytes (cache keys, integrity checks).

Every hash of tensor contents in the package goes through :func:`tensors_sha256`: the basis cache's key and
content check (:mod:`rpsft.core.bases`) and the model key of the evaluation caches
(:func:`rpsft.evaluation.scoring.model_fingerprint`). Each caller chooses the labels (name, shape, dtype), which
are hashed before each tensor's bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor


def tensor_bytes(tensor: Tensor) -> bytes:
    """A tensor's bytes in row-major order (its contiguous CPU copy); ``b""`` for an empty tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensors_sha256(tensors: Iterable[tuple[str, Tensor]], header: str = "") -> str:
    """Hex sha256 of ``header``, then of each ``(label, tensor)`` in order: the label, then the bytes."""
    digest = hashlib.sha256(header.encode())
    with torch.no_grad():
        for label, tensor in tensors:
            digest.update(label.encode())
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()

"""The one tensor fingerprint (rpsft.core.fingerprint) against sha256 computed from numpy's bytes, and the
cache keys built on it."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from rpsft.core.fingerprint import tensor_bytes, tensors_sha256


def _numpy_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bit pattern is the top half of float32
        bits = tensor.float().numpy().astype(np.float32).view(np.uint32) >> 16
        return np.ascontiguousarray(bits.astype("<u2")).tobytes()
    return np.ascontiguousarray(tensor.numpy()).tobytes()


def test_tensor_bytes_are_the_row_major_bytes():
    torch.manual_seed(0)
    cases = [
        torch.randn(3, 5).t(),  # not contiguous
        torch.arange(7, dtype=torch.int64),
        torch.tensor(2.5),  # 0-dim
        torch.randn(2, 3).to(torch.bfloat16),
        torch.zeros(0, 4),
    ]
    for tensor in cases:
        assert tensor_bytes(tensor) == _numpy_bytes(tensor)
    assert tensor_bytes(torch.zeros(0, 4)) == b""


def test_tensors_sha256_hashes_header_labels_and_bytes_in_order():
    a, b = torch.randn(2, 2), torch.arange(3)
    expected = hashlib.sha256(b"head" + b"x" + _numpy_bytes(a) + b"y" + _numpy_bytes(b)).hexdigest()
    assert tensors_sha256([("x", a), ("y", b)], header="head") == expected
    assert tensors_sha256([("y", b), ("x", a)], header="head") != expected
    changed = a.clone()
    changed[0, 0] += 1
    assert tensors_sha256([("x", changed), ("y", b)], header="head") != expected


def test_weights_and_model_fingerprints_follow_every_byte():
    from rpsft.core.bases import weights_fingerprint
    from rpsft.evaluation.scoring import model_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    selection = dict(model.named_parameters())
    key, weights = model_fingerprint(model), weights_fingerprint(selection, "gram")
    assert weights != weights_fingerprint(selection, "exact")
    with torch.no_grad():
        model[1].weight[1, 2] = model[1].weight[1, 2].item() + 1e-3
    assert model_fingerprint(model) != key
    assert weights_fingerprint(dict(model.named_parameters()), "gram") != weights

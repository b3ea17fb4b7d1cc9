import pytest
import rpsft.core.bases as bases_module
import torch
from helpers import decaying_matrix, mean_angle_degrees
from rpsft.core.bases import (
    BasisCacheError,
    compute_bases,
    load_bases,
    load_or_compute_bases,
    save_bases,
    top_k_bases,
)
from torch import nn


def _selection(shapes=((48, 32), (32, 48), (40, 40)), dtype=torch.float32, seed=0):
    return {
        f"model.layers.{i}.mlp.proj.weight": nn.Parameter(decaying_matrix(m, n, seed=seed + i, dtype=dtype))
        for i, (m, n) in enumerate(shapes)
    }


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_sliced_bases_span_the_direct_top_k_subspace(shape):
    selection = _selection([shape], dtype=torch.float64)
    big = compute_bases(selection, 20)
    sliced = big.truncate(7).entries["model.layers.0.mlp.proj.weight"]
    u, _, vh = torch.linalg.svd(selection["model.layers.0.mlp.proj.weight"].detach(), full_matrices=False)
    assert mean_angle_degrees(sliced.u, u[:, :7]) < 1e-4  # arccos near 1 resolves ~sqrt(eps)
    assert mean_angle_degrees(sliced.v, vh[:7].T) < 1e-4  # arccos near 1 resolves ~sqrt(eps)
    direct = compute_bases(selection, 7).entries["model.layers.0.mlp.proj.weight"]
    assert torch.allclose(sliced.sref, direct.sref, atol=1e-10)


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_fast_bases_agree_with_exact_on_decaying_spectrum(method, shape):
    w = decaying_matrix(*shape, decay=0.93, dtype=torch.float32)
    k = 16
    u_exact, v_exact = top_k_bases(w, k, "exact")
    u_fast, v_fast = top_k_bases(w, k, method)
    assert u_fast.shape == (shape[0], k) and v_fast.shape == (shape[1], k)
    assert torch.allclose(u_fast.T @ u_fast, torch.eye(k), atol=1e-4)
    assert mean_angle_degrees(u_fast, u_exact) <= 1.0
    assert mean_angle_degrees(v_fast, v_exact) <= 1.0


def test_truncate_refuses_to_grow_or_leave_full_mode():
    selection = _selection()
    with pytest.raises(ValueError, match="cannot slice"):
        compute_bases(selection, 4).truncate(8)
    with pytest.raises(ValueError, match="cannot slice"):
        compute_bases(selection, 1.0).truncate(4)


def test_save_load_roundtrip_is_bit_identical(tmp_path):
    selection = _selection()
    bases = compute_bases(selection, 0.25)
    bases.fingerprint = "abc"
    save_bases(bases, tmp_path / "b.safetensors", 0.25)
    loaded, k = load_bases(tmp_path / "b.safetensors", expected_fingerprint="abc")
    assert k == 0.25
    for name, entry in bases.entries.items():
        other = loaded.entries[name]
        assert (
            torch.equal(entry.u, other.u)
            and torch.equal(entry.v, other.v)
            and torch.equal(entry.sref, other.sref)
        )
    with pytest.raises(BasisCacheError, match="other weights"):
        load_bases(tmp_path / "b.safetensors", expected_fingerprint="xyz")


def test_corrupt_cache_file_fails_integrity_check(tmp_path):
    bases = compute_bases(_selection(), 4)
    path = tmp_path / "b.safetensors"
    save_bases(bases, path, 4)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(BasisCacheError, match="integrity"):
        load_bases(path)


class _CountingCompute:
    def __init__(self, monkeypatch):
        self.calls = 0
        self._real = bases_module.compute_bases
        monkeypatch.setattr(bases_module, "compute_bases", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._real(*args, **kwargs)


def test_cache_reuses_and_invalidates(tmp_path, monkeypatch):
    counter = _CountingCompute(monkeypatch)
    selection = _selection()
    first = load_or_compute_bases(selection, 8, cache_dir=tmp_path)
    again = load_or_compute_bases(selection, 8, cache_dir=tmp_path)
    assert counter.calls == 1
    for name in first.entries:
        assert torch.equal(first.entries[name].u, again.entries[name].u)
    smaller = load_or_compute_bases(selection, 3, cache_dir=tmp_path)  # sliced from the stored k = 8
    assert counter.calls == 1 and set(smaller.ks.values()) == {3}
    load_or_compute_bases(selection, 12, cache_dir=tmp_path)  # larger k: recompute
    assert counter.calls == 2
    sub = dict(list(selection.items())[:2])  # other selection
    load_or_compute_bases(sub, 8, cache_dir=tmp_path)
    assert counter.calls == 3
    with torch.no_grad():  # changed weights
        next(iter(selection.values()))[0, 0] += 1e-3
    load_or_compute_bases(selection, 8, cache_dir=tmp_path)
    assert counter.calls == 4
    load_or_compute_bases(selection, 8, cache_dir=tmp_path, method="gram")  # other basis method
    assert counter.calls == 5
    load_or_compute_bases(selection, 8, cache_dir=tmp_path, method="randomized")
    load_or_compute_bases(selection, 4, cache_dir=tmp_path, method="randomized")  # sketched per k: no slicing
    assert counter.calls == 7


def test_cache_recomputes_a_corrupt_file(tmp_path, monkeypatch):
    counter = _CountingCompute(monkeypatch)
    selection = _selection()
    load_or_compute_bases(selection, 4, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    bases = load_or_compute_bases(selection, 4, cache_dir=tmp_path)
    assert counter.calls == 2
    assert bases.params is not None


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_cache_file_is_recomputed_never_used(tmp_path, monkeypatch, damage):
    selection = _selection()
    good = load_or_compute_bases(selection, 8, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(raw))
    with pytest.raises(BasisCacheError):
        load_bases(path)
    counter = _CountingCompute(monkeypatch)
    again = load_or_compute_bases(selection, 8, cache_dir=tmp_path)
    assert counter.calls == 1  # recomputed
    for name, entry in good.entries.items():
        assert torch.equal(entry.u, again.entries[name].u)
    load_bases(path)  # and the rewritten file passes its check


def test_ensure_bases_file_finds_the_shared_file_without_loading_it(tmp_path, monkeypatch):
    """A sharded run's rank 0 finds the sweep's file (the one ``load_or_compute_bases`` wrote) from its header
    alone: no tensor is loaded, nothing is recomputed; a larger k or damaged file is computed anew."""
    from rpsft.core.bases import ensure_bases_file

    selection = _selection()
    load_or_compute_bases(selection, 8, cache_dir=tmp_path)  # the sweep's shared file, at k = 8
    (shared,) = tmp_path.glob("*.safetensors")
    counter = _CountingCompute(monkeypatch)

    def no_load(*args, **kwargs):
        raise AssertionError("the bases file was loaded")

    with monkeypatch.context() as patched:
        patched.setattr(bases_module, "load_file", no_load)
        assert ensure_bases_file(selection, 8, cache_dir=tmp_path) == shared
        assert ensure_bases_file(selection, 3, cache_dir=tmp_path) == shared  # sliced later, per rank
        assert ensure_bases_file(selection, 0.1, cache_dir=tmp_path) == shared  # a fraction within k = 8
    assert counter.calls == 0
    assert ensure_bases_file(selection, 12, cache_dir=tmp_path) == shared  # larger k: computed, same name
    assert counter.calls == 1 and load_bases(shared)[1] == 12
    raw = bytearray(shared.read_bytes())
    shared.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: not a usable file
    assert ensure_bases_file(selection, 12, cache_dir=tmp_path) == shared
    assert counter.calls == 2 and load_bases(shared)[1] == 12
    assert ensure_bases_file(selection, 1.0, cache_dir=tmp_path) is None  # full rank keeps W0, no file
    assert counter.calls == 2

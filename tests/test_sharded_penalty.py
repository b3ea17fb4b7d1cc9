"""The row-sharded penalty against the single-process one (float64), on 1 process and on gloo ranks."""

import pytest
import torch
from helpers import decaying_matrix
from hypothesis import given
from hypothesis import strategies as st
from rpsft.core.bases import compute_bases, save_bases
from rpsft.core.distributed import spawn_local
from rpsft.core.regularizer import RPSFTRegularizer
from rpsft.core.row_shards import load_row_shard, row_range, shard_bases
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty
from torch import nn

# uneven rows: 7 rows over 2 ranks is 4 + 3, 3 rows over 4 ranks leaves one rank empty
SHAPES = [(7, 5), (6, 9), (3, 4), (12, 12)]
LAM = 0.7


def _params(dtype=torch.float64):
    return {
        f"layers.{i}.proj.weight": nn.Parameter(decaying_matrix(m, n, seed=i, dtype=dtype))
        for i, (m, n) in enumerate(SHAPES)
    }


def _perturb(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            p.grad = 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype)  # a task gradient to add to


def _reference(k):
    """The single-process penalty value, gradient (task gradient included) and drift."""
    params = _params()
    reg = RPSFTRegularizer(compute_bases(params, k), lam=LAM)
    _perturb(params)
    value = reg.add_grad_()
    return value, {n: p.grad.clone() for n, p in params.items()}, reg.drift()


def _rows_of(params, world_size, rank):
    out = {}
    for name, p in params.items():
        start, end = row_range(p.shape[0], world_size, rank)
        local = nn.Parameter(p.detach()[start:end].clone())
        local.grad = p.grad[start:end].clone()
        out[name] = local
    return out


@given(rows=st.integers(0, 40), world_size=st.integers(1, 9))
def test_row_range_is_torch_chunk_of_dim_0(rows, world_size):
    chunks = list(torch.chunk(torch.arange(rows), world_size)) if rows else []
    for rank in range(world_size):
        start, end = row_range(rows, world_size, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, end)) == expected


def test_row_range_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        row_range(8, 2, 2)


def _simulated_world(penalties):
    """Run ``add_grad_`` on every simulated rank with the all-reduce done by hand (the sum of the buffers)."""
    partials = []
    for pen in penalties:  # each rank's un-reduced buffer
        pen._all_reduce = lambda buffer, sink=partials: sink.append(buffer.clone()) or buffer
        pen.residuals()
    total = torch.stack(partials).sum(0)
    values = []
    for pen in penalties:
        pen._all_reduce = lambda buffer, total=total: total.clone()
        values.append(pen.add_grad_())
    return values


@pytest.mark.parametrize("k", [2, 1.0, 0], ids=["k=2", "k=full", "k=0"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_shard_of_the_gradient_equals_the_rows_of_the_full_one(k, world_size):
    value, grads, drift = _reference(k)
    params = _params()
    bases = compute_bases(params, k)
    _perturb(params)
    ranks = [_rows_of(params, world_size, r) for r in range(world_size)]
    penalties = [
        ShardedRPSFTPenalty(shard_bases(bases, world_size, r), ranks[r], LAM) for r in range(world_size)
    ]
    values = _simulated_world(penalties) if k != 0 else [pen.add_grad_() for pen in penalties]
    for name, grad in grads.items():
        got = torch.cat([ranks[r][name].grad for r in range(world_size)])
        assert torch.linalg.norm(got - grad) <= 1e-12 * torch.linalg.norm(grad)
    for v in values:
        assert v == pytest.approx(value, rel=1e-12, abs=1e-300)
    for pen in penalties:  # measured by add_grad_, before any update: the reference's drift
        assert pen.last_drift() == pytest.approx(drift, rel=1e-12, abs=1e-300)
    if k == 0:
        assert value == 0.0 and all(v == 0.0 for v in drift.values())


def test_penalty_vanishes_at_the_pretrained_weights_with_uneven_shards():
    params = _params()
    bases = compute_bases(params, 3)
    world = 4
    ranks = [_rows_of({n: _with_zero_grad(p) for n, p in params.items()}, world, r) for r in range(world)]
    penalties = [ShardedRPSFTPenalty(shard_bases(bases, world, r), ranks[r], LAM) for r in range(world)]
    values = _simulated_world(penalties)
    scale = sum(float(e.sref.pow(2).sum()) for e in bases.entries.values())
    assert all(0.0 <= v <= 1e-24 * scale for v in values)
    for rank in ranks:
        assert all(p.grad.numel() == 0 or float(p.grad.abs().max()) < 1e-12 for p in rank.values())


def _with_zero_grad(param):
    param.grad = torch.zeros_like(param)
    return param


def test_load_row_shard_reads_the_same_slices_as_shard_bases(tmp_path):
    params = _params()
    for stored_k, k in ((2, 1), (1.0, 1.0)):  # sliced to a smaller k; full rank (W0 rows)
        bases = compute_bases(params, stored_k)
        path = tmp_path / f"bases-{stored_k}.safetensors"
        save_bases(bases, path, stored_k)
        for rank in range(3):
            from_file = load_row_shard(path, 3, rank, k=k)
            in_memory = shard_bases(bases.truncate(k), 3, rank)
            for name, shard in in_memory.items():
                got = from_file[name]
                assert got.rows == shard.rows and got.shape == shard.shape and got.full == shard.full
                pairs = [(got.u_rows, shard.u_rows), (got.v, shard.v), (got.sref, shard.sref)]
                if shard.full:
                    pairs.append((got.w0_rows, shard.w0_rows))
                for a, b in pairs:
                    assert torch.equal(a, b)


def test_load_row_shard_refuses_a_larger_k_and_another_fingerprint(tmp_path):
    from rpsft.core.bases import BasisCacheError

    bases = compute_bases(_params(), 1)
    bases.fingerprint = "abc"
    path = tmp_path / "bases.safetensors"
    save_bases(bases, path, 1)
    with pytest.raises(ValueError, match="k=1"):
        load_row_shard(path, 2, 0, k=2)
    with pytest.raises(BasisCacheError, match="other weights"):
        load_row_shard(path, 2, 0, expected_fingerprint="xyz")


def test_mismatched_rows_name_the_matrix_and_the_fix():
    params = _params()
    bases = compute_bases(params, 2)
    _perturb(params)
    local = _rows_of(params, 2, 0)
    with pytest.raises(ValueError, match="layers.0.proj.weight.*this rank's world size"):
        ShardedRPSFTPenalty(shard_bases(bases, 2, 1), local, LAM)


# ------------------------------------------------------------------------------------------ gloo ranks


def _gloo_worker(rank, world_size, k, out):
    """One gloo rank: its rows, its slices, one real all-reduce; writes its gradient rows and value."""
    params = _params()
    bases = compute_bases(params, k)
    _perturb(params)
    local = _rows_of(params, world_size, rank)
    pen = ShardedRPSFTPenalty(shard_bases(bases, world_size, rank), local, LAM)
    value = pen.add_grad_()
    torch.save(
        {
            "value": value,
            "drift": pen.drift(),
            "last": pen.last_drift(),
            "grads": {n: p.grad for n, p in local.items()},
        },
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.parametrize("k", [0, 2, 1.0], ids=["k=0", "k=2", "k=full"])
def test_gloo_ranks_give_the_single_process_penalty_and_gradient(k, tmp_path):
    world_size = 2
    spawn_local(_gloo_worker, world_size, k, str(tmp_path))
    value, grads, drift = _reference(k)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, grad in grads.items():
        got = torch.cat([res["grads"][name] for res in results])
        assert torch.linalg.norm(got - grad) <= 1e-10 * torch.linalg.norm(grad)
    for res in results:
        assert res["value"] == pytest.approx(value, rel=1e-10, abs=1e-300)
        assert res["drift"] == pytest.approx(drift, rel=1e-10, abs=1e-300)
        assert res["last"] == pytest.approx(drift, rel=1e-10, abs=1e-300)

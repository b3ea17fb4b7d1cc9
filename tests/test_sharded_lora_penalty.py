"""The RPSFT-LoRA penalty on row-sharded adapters against the single-process one (float64): hand-split shards
on one process, and a PEFT LoRA Llama under FSDP2 on 2 gloo ranks."""

import pytest
import torch
from helpers import decaying_matrix
from rpsft.core.bases import Bases, compute_bases, save_bases
from rpsft.core.distributed import spawn_local
from rpsft.core.fsdp import parameter_names, shard_model
from rpsft.core.regularizer import RPSFTRegularizer, _LoraParts, find_lora_parts
from rpsft.core.row_shards import load_row_shard, row_range, shard_bases
from rpsft.core.sharded_lora_penalty import ShardedLoRAPenalty, find_sharded_lora_parts
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty
from torch import nn

# (shape, LoRA rank r, scaling): uneven rows, and r below the world size (ranks with no rows of A)
MATRICES = [((7, 5), 3, 2.0), ((6, 9), 2, 0.5), ((3, 4), 1, 1.0), ((12, 12), 4, 1.5)]
NAMES = [f"layers.{i}.proj.weight" for i in range(len(MATRICES))]
LAM = 0.7
REL = 1e-10


def _bases(k):
    """Bases of the base weights; ``"mixed"``: two matrices at k=2 and two at full rank, in one buffer."""
    weights = {
        name: nn.Parameter(decaying_matrix(m, n, seed=i))
        for i, (name, ((m, n), _, _)) in enumerate(zip(NAMES, MATRICES))
    }
    if k != "mixed":
        return compute_bases(weights, k)
    names = list(weights)
    low = compute_bases({n: weights[n] for n in names[:2]}, 2)
    full = compute_bases({n: weights[n] for n in names[2:]}, 1.0)
    return Bases({**low.entries, **full.entries}, params=weights)


def _adapters(seed=1):
    """LoRA factors ``a`` (r x n) and ``b`` (m x r), with a task gradient already in ``.grad``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ((m, n), r, s) in zip(NAMES, MATRICES):
        a = nn.Parameter(torch.randn(r, n, generator=gen, dtype=torch.float64))
        b = nn.Parameter(torch.randn(m, r, generator=gen, dtype=torch.float64))
        a.grad = 0.01 * torch.randn(a.shape, generator=gen, dtype=a.dtype)
        b.grad = 0.01 * torch.randn(b.shape, generator=gen, dtype=b.dtype)
        out[name] = _LoraParts(a, b, s)
    return out


def _reference(k):
    """The single-process value, gradients (task gradient included) and drift; the closed form checked
    against autograd."""
    lora = _adapters()
    reg = RPSFTRegularizer(_bases(k), lam=LAM, lora=lora)
    value = reg.add_grad_()
    grads = {n: (p.a.grad.clone(), p.b.grad.clone()) for n, p in lora.items()}
    drift = reg.drift()
    auto = _adapters()
    penalty = RPSFTRegularizer(_bases(k), lam=LAM, lora=auto).penalty()
    if penalty.requires_grad:
        penalty.backward()
    for name, (ga, gb) in grads.items():
        assert torch.allclose(auto[name].a.grad, ga, rtol=1e-12, atol=1e-14)
        assert torch.allclose(auto[name].b.grad, gb, rtol=1e-12, atol=1e-14)
    assert float(penalty.detach()) == pytest.approx(value, rel=1e-12, abs=1e-300)
    return value, grads, drift


def _rank_adapters(lora, world_size, rank):
    """This rank's ``torch.chunk`` rows of every ``a`` (over r) and ``b`` (over m), gradients included."""
    out = {}
    for name, parts in lora.items():
        pieces = []
        for full in (parts.a, parts.b):
            start, end = row_range(full.shape[0], world_size, rank)
            local = nn.Parameter(full.detach()[start:end].clone())
            local.grad = full.grad[start:end].clone()
            pieces.append(local)
        out[name] = _LoraParts(pieces[0], pieces[1], parts.scaling)
    return out


def _simulated_world(penalties):
    """``add_grad_`` on every simulated rank, the all-reduce done by hand (the sum of the ranks' buffers)."""
    partials = []
    for pen in penalties:
        pen._all_reduce = lambda buffer, sink=partials: sink.append(buffer.clone()) or buffer
        pen.residuals()
    if not partials:  # nothing to reduce (k = 0)
        return [pen.add_grad_() for pen in penalties]
    total = torch.stack(partials).sum(0)
    for pen in penalties:
        pen._all_reduce = lambda buffer, total=total: total.clone()
    return [pen.add_grad_() for pen in penalties]


def _rel(got, want):
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want).clamp(min=1e-300))


def _sharded_world(k, world_size, **kwargs):
    bases = _bases(k)
    ranks = [_rank_adapters(_adapters(), world_size, r) for r in range(world_size)]
    penalties = [
        ShardedLoRAPenalty(
            shard_bases(bases, world_size, r, lora=True),
            ranks[r],
            LAM,
            rank=r,
            world_size=world_size,
            **kwargs,
        )
        for r in range(world_size)
    ]
    return ranks, penalties


@pytest.mark.parametrize("k", [2, 1.0, "mixed", 0], ids=["k=2", "k=full", "k=mixed", "k=0"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_shard_of_the_lora_gradient_equals_the_rows_of_the_full_one(k, world_size):
    value, grads, drift = _reference(k)
    ranks, penalties = _sharded_world(k, world_size)
    values = _simulated_world(penalties)
    for name, (grad_a, grad_b) in grads.items():
        got_a = torch.cat([ranks[r][name].a.grad for r in range(world_size)])
        got_b = torch.cat([ranks[r][name].b.grad for r in range(world_size)])
        assert _rel(got_a, grad_a) < REL and _rel(got_b, grad_b) < REL, name
    for v in values:
        assert v == pytest.approx(value, rel=REL, abs=1e-300)
    for pen in penalties:
        assert pen.last_drift() == pytest.approx(drift, rel=REL, abs=1e-300)
        assert pen.drift() == pytest.approx(drift, rel=REL, abs=1e-300)  # the weights did not change
        assert pen.penalty() == pytest.approx(value, rel=REL, abs=1e-300)
    if k == 0:
        assert value == 0.0 and all(v == 0.0 for v in drift.values())
    else:
        assert value > 0


def test_the_buffer_is_one_flat_reduce_with_empty_rows_of_a_on_some_ranks():
    """3 ranks: the (3, 4) matrix's r = 1 leaves ranks 1 and 2 without rows of A; their pieces are zeros."""
    _, penalties = _sharded_world(2, 3)
    calls = []
    for pen in penalties:
        pen._all_reduce = lambda buffer, sink=calls: sink.append(buffer.numel()) or buffer
        pen.residuals()
    expected = sum(2 * 2 * r for _, r, _ in MATRICES)  # X (k x r) and Y (r x k) per matrix
    assert calls == [expected] * 3
    assert [pen.a_rows["layers.2.proj.weight"] for pen in penalties] == [(0, 1), (1, 1), (1, 1)]


def test_the_period_skips_steps_and_k_zero_creates_no_gradient():
    ranks, penalties = _sharded_world(2, 1, period=2)
    before = ranks[0]["layers.0.proj.weight"].a.grad.clone()
    assert penalties[0].add_grad_(1) is None
    assert torch.equal(ranks[0]["layers.0.proj.weight"].a.grad, before)
    assert penalties[0].add_grad_(2) > 0
    assert not torch.equal(ranks[0]["layers.0.proj.weight"].a.grad, before)
    ranks, penalties = _sharded_world(0, 2)
    for rank in ranks:
        for parts in rank.values():
            parts.a.grad = parts.b.grad = None
    assert [pen.add_grad_(1) for pen in penalties] == [0.0, 0.0]
    assert all(p.a.grad is None and p.b.grad is None for rank in ranks for p in rank.values())


def test_lora_slices_read_from_the_file_hold_no_w0_and_no_sref(tmp_path):
    bases = _bases("mixed")
    path = tmp_path / "bases.safetensors"
    save_bases(bases, path, 2)
    for rank in range(3):
        from_file = load_row_shard(path, 3, rank, lora=True)
        in_memory = shard_bases(bases, 3, rank, lora=True)
        for name, shard in in_memory.items():
            got = from_file[name]
            assert got.rows == shard.rows and got.full == shard.full and got.k == shard.k
            assert got.w0_rows is None and shard.w0_rows is None
            assert got.sref.numel() == 0 and shard.sref.numel() == 0
            assert torch.equal(got.u_rows, shard.u_rows) and torch.equal(got.v, shard.v)
        assert [s.full for s in from_file.values()] == [False, False, True, True]
        assert all(s.nbytes() == 0 for s in from_file.values() if s.full)


def test_the_full_weight_penalty_refuses_lora_slices_and_mismatched_adapters_name_the_fix():
    bases = _bases("mixed")
    weights = {
        n: nn.Parameter(e.w0 if e.full else torch.zeros(e.shape, dtype=torch.float64))
        for n, e in bases.entries.items()
    }
    for name in NAMES[:3:2]:  # one projected, one full-mode matrix
        with pytest.raises(ValueError, match=f"{name} holds LoRA slices"):
            ShardedRPSFTPenalty({name: shard_bases(bases, 1, 0, lora=True)[name]}, weights, LAM)
    local = _rank_adapters(_adapters(), 2, 0)
    with pytest.raises(ValueError, match="lora_A holds .* rank 1 of 2"):
        ShardedLoRAPenalty(shard_bases(bases, 2, 0, lora=True), local, LAM, rank=1, world_size=2)
    with pytest.raises(ValueError, match="layers.0.proj.weight holds 4 local rows"):
        ShardedLoRAPenalty(shard_bases(bases, 2, 1, lora=True), local, LAM, rank=0, world_size=2)
    with pytest.raises(KeyError, match="no LoRA adapter"):
        ShardedLoRAPenalty(shard_bases(bases, 1, 0, lora=True), {}, LAM)


# ------------------------------------------------------------------------------- a PEFT LoRA Llama

LLAMA_LAM, LLAMA_LR = 3.0, 1e-2


def lora_llama():
    """A tiny random Llama (hidden 32, 2 layers, float64) with LoRA on q (r = 3) and v (r = 1), both factors
    random, and its bases: q at k = 4, v at full rank."""
    from peft import LoraConfig, get_peft_model
    from rpsft.core.selection import select_matrices
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(config).to(torch.float64)
    q = compute_bases(select_matrices(base, {"types": ["q"]}), 4)
    v = compute_bases(select_matrices(base, {"types": ["v"]}), 1.0)
    bases = Bases({**q.entries, **v.entries})
    lora_config = LoraConfig(
        r=3,
        lora_alpha=6,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 1},
        init_lora_weights=False,
    )
    return get_peft_model(base, lora_config).to(torch.float64), bases


def _batch():
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "labels": ids}


def _trainable(model):
    return {n: p for n, p in parameter_names(model).items() if p.requires_grad}


def _run(model, penalty):
    """The penalty's value and gradient at the initial adapters, then 2 AdamW steps on a fixed SFT loss plus
    the penalty: ``(value, grads, step values, adapters, drift)``, everything as full tensors."""
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # noqa: E731
    trainable = _trainable(model)
    value = penalty.add_grad_()
    grads = {n: full(p.grad) for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=LLAMA_LR, weight_decay=0.01)
    optimizer.zero_grad(set_to_none=True)
    values = []
    for step in (1, 2):
        model(**_batch()).loss.backward()
        values.append(penalty.add_grad_(step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value, grads, values, {n: full(p) for n, p in trainable.items()}, penalty.drift()


def _lora_worker(rank, world_size, bases_path, out):
    from torch.distributed.device_mesh import init_device_mesh

    model, _ = lora_llama()
    shard_model(model, init_device_mesh("cpu", (world_size,)))
    shards = load_row_shard(bases_path, world_size, rank, lora=True)
    assert all(s.u_rows.shape[0] < s.shape[0] for s in shards.values() if not s.full)  # never the full U
    penalty = ShardedLoRAPenalty.from_model(model, shards, LLAMA_LAM)
    assert all(
        type(p.a).__name__ == "DTensor" and type(p.b).__name__ == "DTensor" for p in penalty.lora.values()
    )
    if rank == 1:  # v_proj's lora_A has r = 1 row: none on rank 1
        assert all(penalty.a_rows[n] == (1, 1) for n in shards if "v_proj" in n)
    result = _run(model, penalty)
    if rank == 0:
        torch.save(result, out)


def test_find_sharded_lora_parts_sees_through_activation_checkpointing():
    from rpsft.core.fsdp import decoder_blocks
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, bases = lora_llama()
    names = list(bases.entries)
    expected = find_lora_parts(model, names)
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block)
    with pytest.raises(KeyError):
        find_lora_parts(model, names)
    found = find_sharded_lora_parts(model, names)
    assert set(found) == set(expected) == set(names)
    for name, parts in expected.items():
        assert found[name].a is parts.a and found[name].b is parts.b and found[name].scaling == parts.scaling
    assert {p.a.shape[0] for n, p in found.items() if "v_proj" in n} == {1}


@pytest.mark.slow
def test_fsdp2_lora_adapters_under_the_sharded_penalty_train_like_one_process(tmp_path):
    """2 gloo ranks (FSDP2, A of v_proj with fewer rows than ranks) against the single-process regularizer:
    the penalty and its gradient, then the adapters after 2 AdamW steps."""
    model, bases = lora_llama()
    path = tmp_path / "bases.safetensors"
    save_bases(bases, path, 4)
    out = tmp_path / "rank0.pt"
    spawn_local(_lora_worker, 2, str(path), str(out))
    value, grads, values, adapters, drift = torch.load(out)
    reference = RPSFTRegularizer(bases, lam=LLAMA_LAM, lora=find_lora_parts(model, list(bases.entries)))
    initial = {n: p.detach().clone() for n, p in _trainable(model).items()}
    ref_value, ref_grads, ref_values, ref_adapters, ref_drift = _run(model, reference)
    assert ref_value > 0 and len(ref_grads) == 8  # A and B of q and v in 2 layers
    assert value == pytest.approx(ref_value, rel=REL)
    for name, grad in ref_grads.items():
        assert _rel(grads[name], grad) < REL, name
    assert values == pytest.approx(ref_values, rel=REL)
    for name, weight in ref_adapters.items():
        moved = float((weight - initial[name]).norm())
        assert moved > 0, name
        assert float((adapters[name] - weight).norm()) <= 1e-9 * moved, name
    assert drift == pytest.approx(ref_drift, rel=REL)

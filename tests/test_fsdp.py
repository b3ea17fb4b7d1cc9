"""FSDP2 training with the sharded penalty (2 gloo ranks, tiny Llama, float64) against one process."""

import pytest
import torch
from rpsft.core.bases import compute_bases, save_bases
from rpsft.core.distributed import spawn_local
from rpsft.core.fsdp import adamw, full_state, parameter_names, shard_model, train_steps
from rpsft.core.regularizer import RPSFTRegularizer
from rpsft.core.row_shards import load_row_shard
from rpsft.core.selection import select_matrices
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty

LAM, LR, STEPS, WORLD = 5.0, 1e-2, 3, 2


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(torch.float64)


def batches(n=STEPS, rows=5, length=12, seed=3):
    """Global batches with a prompt (unscored) part of varying length; 5 rows split 3 + 2 over 2 ranks."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (rows, length), generator=gen)
        labels = ids.clone()
        for r in range(rows):
            labels[r, : int(torch.randint(1, length // 2, (1,), generator=gen))] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def reference_run(k):
    """One process, no sharding, the single-process regularizer."""
    model = tiny_llama()
    selection = select_matrices(model, "all")
    reg = RPSFTRegularizer(compute_bases(selection, k), lam=LAM) if k != 0 else None
    history = train_steps(model, batches(), adamw(model, LR, 0.01), penalty=reg)
    return history, full_state(model), (reg.drift() if reg else {})


def _fsdp_worker(rank, world_size, k, bases_path, out, activation_checkpointing):
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_llama()
    names = list(select_matrices(model, "all"))
    shard_model(
        model, init_device_mesh("cpu", (world_size,)), activation_checkpointing=activation_checkpointing
    )
    named = parameter_names(model)
    assert all(type(named[n]).__name__ == "DTensor" for n in names)
    penalty = None
    if bases_path:
        shards = load_row_shard(bases_path, world_size, rank)
        assert all(s.u_rows.shape[0] < s.shape[0] for s in shards.values() if not s.full)  # never the full U
        penalty = ShardedRPSFTPenalty(shards, {n: named[n] for n in shards}, LAM)
    history = train_steps(model, batches(), adamw(model, LR, 0.01), penalty=penalty)
    state = full_state(model)
    drift = penalty.drift() if penalty else {}
    if rank == 0:
        torch.save({"history": history, "state": state, "drift": drift}, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "k, activation_checkpointing",
    [(4, False), (1.0, False), (0, False), (4, True)],
    ids=["k=4", "k=full", "k=0", "k=4-checkpointed"],
)
def test_fsdp2_two_ranks_train_like_one_process(k, activation_checkpointing, tmp_path):
    """After 3 AdamW steps the weights, losses, penalties and drift of 2 FSDP2 ranks equal one process's."""
    bases_path = None
    if k != 0:
        bases_path = tmp_path / "bases.safetensors"
        save_bases(compute_bases(select_matrices(tiny_llama(), "all"), k), bases_path, k)
    out = tmp_path / "rank0.pt"
    spawn_local(_fsdp_worker, WORLD, k, bases_path and str(bases_path), str(out), activation_checkpointing)
    sharded = torch.load(out)
    history, state, drift = reference_run(k)
    for name, weight in state.items():
        moved = (weight - tiny_llama().state_dict()[name]).norm()
        assert moved > 0, name  # every parameter trained
        assert (sharded["state"][name] - weight).norm() <= 1e-9 * moved, name
    for a, b in zip(sharded["history"], history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)
        if k == 0:
            assert a["penalty"] is None and b["penalty"] is None
        else:
            assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-9, abs=1e-20)
    if k != 0:
        assert history[-1]["penalty"] > 0  # zero at the pretrained weights, then the drift is penalized
    assert sharded["drift"] == pytest.approx(drift, rel=1e-9)


def test_micro_batches_of_one_step_give_the_update_of_the_whole_batch():
    """Gradient accumulation: each step given as 2 micro-batches (rows 0-1, rows 2-4 with other tokens counts)
    trains like the whole global batch, because the loss is divided by the tokens of the whole step."""
    whole, split = tiny_llama(), tiny_llama()
    reg_whole = RPSFTRegularizer(compute_bases(select_matrices(whole, "all"), 4), lam=LAM)
    reg_split = RPSFTRegularizer(compute_bases(select_matrices(split, "all"), 4), lam=LAM)
    want = train_steps(whole, batches(), adamw(whole, LR, 0.01), penalty=reg_whole)
    steps = [[{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}] for b in batches()]
    got = train_steps(split, steps, adamw(split, LR, 0.01), penalty=reg_split)
    initial = tiny_llama().state_dict()
    for name, weight in full_state(whole).items():
        moved = (weight - initial[name]).norm()
        assert (full_state(split)[name] - weight).norm() <= 1e-9 * moved, name
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-9, abs=1e-20)
        assert a["learning_rate"] == b["learning_rate"] == LR

"""``penalty_mode: decoupled``: the exact proximal step of the penalty after the optimizer step.

The prox step is checked against the minimizer of ``lambda ||Uk^T (W - W0) Vk||^2 + ||W - Z||^2 / (2 eta)``
found by solving its normal equations in float64 (a Kronecker-product linear system, not the closed form), its
limits (lambda -> infinity, lambda = 0), the training paths (the HF Trainer, FSDP2 ``train_steps``), the
row-sharded form on 2 gloo ranks, and the config and sweep knob.
"""

import pytest
import torch
from helpers import decaying_matrix
from rpsft.core.bases import compute_bases, save_bases
from rpsft.core.config import ConfigError, TrainConfig, load_train_config
from rpsft.core.distributed import spawn_local
from rpsft.core.fsdp import adamw, full_state, parameter_names, shard_model, train_steps
from rpsft.core.regularizer import RPSFTRegularizer
from rpsft.core.row_shards import load_row_shard, row_range, shard_bases
from rpsft.core.selection import select_matrices
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty
from torch import nn

SHAPES = [(7, 5), (6, 9), (3, 4), (12, 12)]  # 7 rows over 2 ranks: 4 + 3
LAM, ETA = 0.7, 0.3
K_CASES = pytest.mark.parametrize("k", [2, 1.0, 0], ids=["k=2", "k=full", "k=0"])


def _params(dtype=torch.float64):
    return {
        f"layers.{i}.proj.weight": nn.Parameter(decaying_matrix(m, n, seed=i, dtype=dtype))
        for i, (m, n) in enumerate(SHAPES)
    }


def _move(params, scale=0.2, seed=1):
    """The optimizer's output Z: the weights moved off W0 (in every direction)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_((scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype))


def _projectors(entry, shape):
    """``(Uk Uk^T, Vk Vk^T)`` in float64 (identities in full mode, zeros at k = 0)."""
    m, n = shape
    if entry.full:
        return torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    u, v = entry.u.double(), entry.v.double()
    return u @ u.T, v @ v.T


def _argmin(z, w0, pu, pv, lam, eta):
    """The minimizer of ``lam ||Uk^T (W - W0) Vk||^2 + ||W - Z||^2 / (2 eta)`` from its normal equations
    ``2 lam Pu (W - W0) Pv + (W - Z) / eta = 0``, solved as one linear system in ``vec(W - W0)``
    (``vec(Pu X Pv) = (Pv^T kron Pu) vec(X)``, column-major ``vec``)."""
    m, n = z.shape
    system = 2 * lam * eta * torch.kron(pv.T.contiguous(), pu.contiguous()) + torch.eye(
        m * n, dtype=torch.float64
    )
    rhs = (z - w0).T.reshape(-1)  # column-major vec
    x = torch.linalg.solve(system, rhs).reshape(n, m).T
    return w0 + x


def _block(w, w0, entry):
    if entry.full:
        return w - w0
    return entry.u.double().T @ (w - w0) @ entry.v.double()


# ------------------------------------------------------------------------------------------ the prox step


@K_CASES
def test_the_prox_step_is_the_minimizer_of_the_proximal_objective(k):
    params = _params()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    reg = RPSFTRegularizer(compute_bases(params, k), lam=LAM, mode="decoupled")
    _move(params)
    z = {n: p.detach().clone() for n, p in params.items()}
    value = reg.prox_step_(ETA)
    after = 0.0
    for name, p in params.items():
        entry = reg.bases.entries[name]
        pu, pv = _projectors(entry, p.shape)
        want = _argmin(z[name], w0[name], pu, pv, LAM, ETA)
        assert torch.linalg.norm(p.detach() - want) <= 1e-12 * torch.linalg.norm(want), name
        if k == 0:
            assert torch.equal(p.detach(), z[name])  # nothing protected: W = Z
        else:
            assert torch.linalg.norm(p.detach() - z[name]) > 1e-3  # the step moved it
        after += float(_block(p.detach(), w0[name], entry).pow(2).sum())
    assert value == pytest.approx(LAM * after, rel=1e-10, abs=1e-300)  # the penalty after the step
    assert reg.last_drift() == pytest.approx(reg.drift(), rel=1e-10, abs=1e-300)  # the drift after the step


def test_a_bf16_weight_takes_the_float64_step_up_to_its_own_rounding():
    params = _params(torch.bfloat16)
    w0 = {n: p.detach().double() for n, p in params.items()}
    reg = RPSFTRegularizer(compute_bases(params, 2), lam=LAM, mode="decoupled")
    assert next(iter(reg.bases.entries.values())).u.dtype == torch.float32
    _move(params)
    z = {n: p.detach().double() for n, p in params.items()}
    reg.prox_step_(ETA)
    for name, p in params.items():
        pu, pv = _projectors(reg.bases.entries[name], p.shape)
        want = _argmin(z[name], w0[name], pu, pv, LAM, ETA)
        assert p.dtype == torch.bfloat16
        assert torch.linalg.norm(p.detach().double() - want) <= 2**-8 * torch.linalg.norm(want), name


@pytest.mark.parametrize("k", [2, 1.0], ids=["k=2", "k=full"])
def test_an_infinite_lambda_zeroes_the_protected_block_and_leaves_the_complement(k):
    params = _params()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    reg = RPSFTRegularizer(compute_bases(params, k), lam=1e12, mode="decoupled")
    _move(params)
    z = {n: p.detach().clone() for n, p in params.items()}
    reg.prox_step_(ETA)
    for name, p in params.items():
        entry = reg.bases.entries[name]
        w = p.detach()
        before = torch.linalg.norm(_block(z[name], w0[name], entry))
        assert torch.linalg.norm(_block(w, w0[name], entry)) <= 1e-9 * before, name
        pu, pv = _projectors(entry, w.shape)
        eye_m, eye_n = torch.eye(w.shape[0], dtype=w.dtype), torch.eye(w.shape[1], dtype=w.dtype)
        # the move lies in the protected block: nothing outside span(Uk) x span(Vk) changed
        assert torch.linalg.norm((eye_m - pu) @ (w - z[name])) <= 1e-12 * torch.linalg.norm(z[name]), name
        assert torch.linalg.norm((w - z[name]) @ (eye_n - pv)) <= 1e-12 * torch.linalg.norm(z[name]), name
        if entry.full:
            assert torch.allclose(w, w0[name], rtol=0, atol=1e-10)


def test_lambda_zero_and_a_skipped_period_leave_the_weights_as_the_optimizer_left_them():
    params = _params()
    zero = RPSFTRegularizer(compute_bases(params, 2), lam=0.0, mode="decoupled")
    periodic = RPSFTRegularizer(compute_bases(params, 2), lam=LAM, period=2, mode="decoupled")
    _move(params)
    z = {n: p.detach().clone() for n, p in params.items()}
    assert zero.prox_step_(ETA, step=0) is None
    assert zero.prox_step_(ETA) == 0.0
    assert periodic.prox_step_(ETA, step=1) is None
    assert all(torch.equal(p.detach(), z[n]) for n, p in params.items())
    assert periodic.prox_step_(ETA, step=2) > 0
    assert periodic.last_step_applied == 2
    assert not all(torch.equal(p.detach(), z[n]) for n, p in params.items())


def test_decoupled_adds_no_penalty_gradient():
    from rpsft.core.trainer import RPSFTCallback

    for mode in ("loss", "decoupled"):
        params = _params()
        reg = RPSFTRegularizer(compute_bases(params, 2), lam=LAM, mode=mode)
        _move(params)
        for p in params.values():
            p.grad = torch.zeros_like(p)
        RPSFTCallback(reg).on_pre_optimizer_step(None, type("S", (), {"global_step": 0})(), None)
        untouched = all(float(p.grad.abs().max()) == 0.0 for p in params.values())
        assert untouched == (mode == "decoupled"), mode


# ------------------------------------------------------------------------------------------ config


def test_rpsft_lora_refuses_decoupled_naming_the_field_and_the_fix(tmp_path):
    with pytest.raises(
        ValueError, match="penalty_mode: decoupled is not defined for method 'rpsft-lora'.*Fix"
    ):
        TrainConfig(method="rpsft-lora", penalty_mode="decoupled")
    path = tmp_path / "train.yaml"
    path.write_text("method: rpsft-lora\npenalty_mode: decoupled\n")
    with pytest.raises(ConfigError, match=r"penalty_mode: .*Fix: penalty_mode: loss"):
        load_train_config(path)
    with pytest.raises(ValueError, match="penalty_mode"):
        TrainConfig(penalty_mode="prox")
    params = _params()  # the regularizer refuses it too
    parts = {n: object() for n in params}
    with pytest.raises(ValueError, match="penalty_mode: decoupled is not defined for RPSFT-LoRA"):
        RPSFTRegularizer(compute_bases(params, 2), lam=LAM, lora=parts, mode="decoupled")


def test_the_penalized_methods_read_the_mode_and_the_others_ignore_it():
    for name in ("rpsft", "l2-init"):
        config = TrainConfig(method=name, k=8, penalty_mode="decoupled")
        assert config.knob_values()["penalty_mode"] == "decoupled"
    assert TrainConfig(method="rpsft-lora").penalty_mode == "loss"
    for name in ("sft", "dft", "iw", "lora", "osf"):  # as period and lambda: accepted, not read, not logged
        config = TrainConfig(method=name, k=8, penalty_mode="decoupled")
        assert "penalty_mode" not in config.knob_values()


def _sweep(**changes):
    from rpsft.sweeps.config.sweep import parse_sweep_config

    raw = {
        "name": "modes",
        "output_dir": "/tmp/rpsft-test-sweeps",
        "train": {"max_steps": 2},
        "space": {"k": [4], "lambda": [1.0]},
        "references": ["sft"],
        "search": {"num_trials": 1, "algorithm": "grid"},
    }
    raw.update(changes)
    return parse_sweep_config(raw)


def _logged_key(config, params):
    """The configuration key of a trial as its MLflow params give it (run_trial logs these)."""
    from rpsft.sweeps.analysis.uncertainty import knob_key
    from rpsft.sweeps.trial.run import trial_knobs

    train = config.trial_train_config(params)
    logged = {"method": train.method, **trial_knobs(train, params), "layers": "all"}
    if params.get("reference"):
        logged["reference"] = params["reference"]
    return train, knob_key(logged)


def test_a_sweep_searches_both_modes_as_two_configurations():
    from rpsft.sweeps.search.initial_design import initial_design
    from rpsft.sweeps.search.space import search_dims, search_distributions
    from rpsft.sweeps.store.sweep_store import trial_label

    config = _sweep(space={"k": [4], "lambda": [1.0], "penalty_mode": ["loss", "decoupled"]})
    assert config.grid_size() == 2
    dims = search_dims(config)
    assert dims["penalty_mode"] == ["loss", "decoupled"]
    design = initial_design(search_distributions(dims), 2, seed=0)
    assert sorted(point["penalty_mode"] for point in design) == ["decoupled", "loss"]
    trials = [
        {"k": 4, "lambda": 1.0, "layers": "all", "period": 1, "penalty_mode": m} for m in dims["penalty_mode"]
    ]
    (loss, loss_key), (dec, dec_key) = (_logged_key(config, p) for p in trials)
    assert (loss.penalty_mode, dec.penalty_mode) == ("loss", "decoupled")
    assert loss_key != dec_key
    assert trial_label(trials[0]) == "rpsft k=4 lambda=1 layers=all period=1"  # loss keeps its old label
    assert trial_label(trials[1]) == "rpsft k=4 lambda=1 layers=all period=1 penalty_mode=decoupled"
    # a space of only `loss` (the default) adds no dimension
    assert "penalty_mode" not in search_dims(_sweep())


def test_references_differing_only_in_penalty_mode_are_different_configurations():
    refs = [
        {"method": "rpsft", "k": 4, "lambda": 1.0},
        {"method": "rpsft", "k": 4, "lambda": 1.0, "penalty_mode": "decoupled"},
    ]
    config = _sweep(references=refs)
    first, second = config.reference_params()
    (a, key_a), (b, key_b) = _logged_key(config, first), _logged_key(config, second)
    assert (a.penalty_mode, b.penalty_mode) == ("loss", "decoupled")
    assert key_a != key_b and first["reference"] != second["reference"]


def test_a_sweep_refuses_decoupled_rpsft_lora_and_a_shared_train_mode():
    from rpsft.sweeps.config.errors import SweepConfigError

    with pytest.raises(SweepConfigError, match=r"references\[0\].*penalty_mode: decoupled is not defined"):
        _sweep(references=[{"method": "rpsft-lora", "penalty_mode": "decoupled"}])
    with pytest.raises(SweepConfigError, match="penalty_mode are set per trial"):
        _sweep(train={"max_steps": 2, "penalty_mode": "decoupled"})
    with pytest.raises(SweepConfigError, match="space.penalty_mode"):
        _sweep(space={"k": [4], "lambda": [1.0], "penalty_mode": ["prox"]})


# ------------------------------------------------------------------------------------------ training


def tiny_llama(seed=0, hidden=24):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(torch.float64)


def batches(n, rows=4, length=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (rows, length), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def _trainer_run(tmp_path, mode, lam, *, perturb=True, steps=3):
    """RPSFTTrainer on a tiny float64 Llama (linear schedule: a new rate every step), from weights moved off
    the pretrained ones (so that a penalty gradient would show at the first step); returns the trainer, the
    regularizer (or None) and the learning rates each prox step received."""
    from rpsft.core.trainer import RPSFTTrainer
    from transformers import PrinterCallback, TrainingArguments

    model = tiny_llama()
    selection = select_matrices(model, "all")
    reg = None
    if mode is not None:
        reg = RPSFTRegularizer(compute_bases(selection, 4), lam=lam, mode=mode)
    if perturb:
        _move(selection, scale=0.02)
    rates = []
    if reg is not None:
        prox = reg.prox_step_
        reg.prox_step_ = lambda lr, step=None: rates.append(lr) or prox(lr, step)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{mode}-{lam}"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    data = [{k: v[i] for k, v in b.items()} for b in batches(steps) for i in range(4)]
    trainer = RPSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
        regularizer=reg,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer, reg, rates


def _steps(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_decoupled_lambda_zero_trains_exactly_like_sft(tmp_path):
    sft, _, _ = _trainer_run(tmp_path, None, 0.0)
    zero, _, rates = _trainer_run(tmp_path, "decoupled", 0.0)
    assert rates == []  # lambda = 0 never applies
    want, got = dict(sft.model.named_parameters()), dict(zero.model.named_parameters())
    assert any(not torch.equal(want[n], p) for n, p in tiny_llama().named_parameters())  # it trained
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_the_trainer_takes_the_prox_step_at_each_steps_learning_rate_outside_the_gradient(tmp_path):
    sft, _, _ = _trainer_run(tmp_path, None, 0.0)
    loss, _, _ = _trainer_run(tmp_path, "loss", 50.0)
    dec, reg, rates = _trainer_run(tmp_path, "decoupled", 50.0)
    logged = _steps(dec)
    # the rate each update used (the Trainer logs it before stepping the scheduler): 1e-2 * (1 - t / 3)
    assert rates == pytest.approx([entry["learning_rate"] for entry in logged], rel=1e-12)
    assert rates == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3], rel=1e-12)
    # no penalty gradient: the first step's gradient (same weights, same batch) is SFT's, not the loss form's
    first = [_steps(t)[0]["grad_norm"] for t in (sft, loss, dec)]
    assert first[2] == pytest.approx(first[0], rel=1e-12)
    assert abs(first[1] - first[0]) > 1e-3 * first[0]
    # the logged drift is the drift after the last prox step
    assert logged[-1]["rpsft/drift_max"] == pytest.approx(max(reg.drift().values()), rel=1e-9)
    assert reg.last_step_applied == 2


def _drift_after(lam, steps=8):
    """A probe-like run (tiny float64 Llama, AdamW lr 1e-2, clip 1) with the library's prox step; the
    protected drift ||Uk^T (W - W0) Vk||_F over all matrices."""
    model = tiny_llama()
    reg = RPSFTRegularizer(compute_bases(select_matrices(model, "all"), 0.25), lam=lam, mode="decoupled")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for batch in batches(steps):
        optimizer.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        reg.prox_step_(optimizer.param_groups[0]["lr"])
    return sum(d * d for d in reg.drift().values()) ** 0.5


def test_the_decoupled_drift_falls_as_one_over_lambda():
    drift = {lam: _drift_after(lam) for lam in (10.0, 100.0, 1000.0)}
    assert drift[10.0] > drift[100.0] > drift[1000.0] > 0
    assert drift[100.0] / drift[1000.0] >= 5  # O(1/lambda): about 10 per decade (9.6 here)
    assert drift[10.0] / drift[100.0] >= 3  # 7.5 here: 8 steps do not reach lambda = 10's equilibrium


# ------------------------------------------------------------------------------------------ sharded


def _rows_of(params, world_size, rank):
    out = {}
    for name, p in params.items():
        start, end = row_range(p.shape[0], world_size, rank)
        out[name] = nn.Parameter(p.detach()[start:end].clone())
    return out


def _reference_prox(k):
    params = _params()
    reg = RPSFTRegularizer(compute_bases(params, k), lam=LAM, mode="decoupled")
    _move(params)
    value = reg.prox_step_(ETA)
    return value, {n: p.detach().clone() for n, p in params.items()}, reg.last_drift()


def _gloo_prox_worker(rank, world_size, k, out):
    params = _params()
    bases = compute_bases(params, k)
    _move(params)
    local = _rows_of(params, world_size, rank)
    pen = ShardedRPSFTPenalty(shard_bases(bases, world_size, rank), local, LAM, mode="decoupled")
    value = pen.prox_step_(ETA)
    torch.save(
        {
            "value": value,
            "last": pen.last_drift(),
            "drift": pen.drift(),
            "rows": {n: p.detach() for n, p in local.items()},
        },
        f"{out}/rank{rank}.pt",
    )


@K_CASES
def test_two_gloo_ranks_take_the_single_process_prox_step(k, tmp_path):
    world_size = 2
    spawn_local(_gloo_prox_worker, world_size, k, str(tmp_path))
    value, weights, drift = _reference_prox(k)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, weight in weights.items():
        got = torch.cat([res["rows"][name] for res in results])
        assert torch.linalg.norm(got - weight) <= 1e-12 * torch.linalg.norm(weight), name
    for res in results:
        assert res["value"] == pytest.approx(value, rel=1e-10, abs=1e-300)
        assert res["last"] == pytest.approx(drift, rel=1e-10, abs=1e-300)
        assert res["drift"] == pytest.approx(drift, rel=1e-9, abs=1e-300)  # measured again: the same


STEPS = 3


def _linear(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / STEPS)


def _one_process_run(k):
    model = tiny_llama()
    reg = RPSFTRegularizer(compute_bases(select_matrices(model, "all"), k), lam=LAM * 20, mode="decoupled")
    optimizer = adamw(model, 1e-2, 0.01)
    history = train_steps(model, batches(STEPS, rows=5), optimizer, penalty=reg, scheduler=_linear(optimizer))
    return history, full_state(model), reg.drift()


def _fsdp_prox_worker(rank, world_size, k, bases_path, out):
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_llama()
    names = list(select_matrices(model, "all"))
    shard_model(model, init_device_mesh("cpu", (world_size,)))
    named = parameter_names(model)
    shards = load_row_shard(bases_path, world_size, rank)
    penalty = ShardedRPSFTPenalty(shards, {n: named[n] for n in names}, LAM * 20, mode="decoupled")
    optimizer = adamw(model, 1e-2, 0.01)
    history = train_steps(
        model, batches(STEPS, rows=5), optimizer, penalty=penalty, scheduler=_linear(optimizer)
    )
    state, drift = full_state(model), penalty.drift()
    if rank == 0:
        torch.save({"history": history, "state": state, "drift": drift}, out)


@pytest.mark.slow
@pytest.mark.parametrize("k", [4, 1.0], ids=["k=4", "k=full"])
def test_fsdp2_train_steps_take_the_prox_step_like_one_process(k, tmp_path):
    """3 AdamW steps on a linear schedule: 2 FSDP2 ranks give one process's weights, penalties and drift."""
    bases_path = tmp_path / "bases.safetensors"
    save_bases(compute_bases(select_matrices(tiny_llama(), "all"), k), bases_path, k)
    spawn_local(_fsdp_prox_worker, 2, k, str(bases_path), str(tmp_path / "rank0.pt"))
    sharded = torch.load(tmp_path / "rank0.pt")
    history, state, drift = _one_process_run(k)
    initial = tiny_llama().state_dict()
    for name, weight in state.items():
        moved = (weight - initial[name]).norm()
        assert (sharded["state"][name] - weight).norm() <= 1e-9 * moved, name
    for a, b in zip(sharded["history"], history, strict=True):
        assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-9) and b["penalty"] > 0
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert sharded["drift"] == pytest.approx(drift, rel=1e-9)
    # the record's penalty is the one after the step's prox: lambda * the drift^2 at the end
    assert history[-1]["penalty"] == pytest.approx(LAM * 20 * sum(d * d for d in drift.values()), rel=1e-9)


def test_a_trial_logged_without_the_default_knobs_groups_with_one_that_logs_them():
    from rpsft.sweeps.analysis.uncertainty import knob_key

    old = {"method": "rpsft", "k": "32", "lambda": "100.0", "reference": "rpsft k=32 seed=0"}
    new = {**old, "penalty_mode": "loss", "optimizer": "adamw_torch", "reference": "rpsft k=32 seed=1"}
    assert knob_key(old) == knob_key(new)
    assert knob_key({**new, "penalty_mode": "decoupled"}) != knob_key(old)
    assert knob_key({**new, "optimizer": "sgd"}) != knob_key(old)

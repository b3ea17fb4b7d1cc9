import pytest
import torch
from helpers import decaying_matrix
from rpsft.core.bases import compute_bases, resolve_k
from rpsft.core.regularizer import RPSFTRegularizer, find_lora_parts
from torch import nn

SHAPES = [(24, 24), (40, 16), (16, 40)]


def _params(shapes, dtype=torch.float64, seed=0):
    return {
        f"layers.{i}.proj.weight": nn.Parameter(decaying_matrix(m, n, seed=seed + i, dtype=dtype))
        for i, (m, n) in enumerate(shapes)
    }


def _perturb(params, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_penalty_is_zero_at_pretrained_weights(dtype):
    params = _params(SHAPES, dtype=dtype)
    reg = RPSFTRegularizer(compute_bases(params, 6), lam=3.0)
    assert reg.penalty().item() == 0.0
    assert reg.add_grad_() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in params.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 1.0])
def test_closed_form_gradient_matches_autograd_float64(shape, k):
    params = _params([shape])
    reg = RPSFTRegularizer(compute_bases(params, k), lam=0.7)
    _perturb(params)
    reg.penalty().backward()
    autograd = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    value = reg.add_grad_()
    for name, p in params.items():
        rel = (p.grad - autograd[name]).norm() / autograd[name].norm()
        assert rel < 1e-10
    assert value == pytest.approx(reg.penalty().item(), rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_penalty_equals_reference_formula_with_independent_svd(shape):
    params = _params([shape])
    ((name, w),) = params.items()
    k = 4
    w0 = w.detach().clone()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    uk, vk = u[:, :k], vh[:k].T
    sref = uk.T @ w0 @ vk
    reg = RPSFTRegularizer(compute_bases(params, k), lam=1.0)
    _perturb(params)
    reference = (uk.T @ (w.detach() @ vk) - sref).pow(2).sum()
    direct = (uk.T @ (w.detach() - w0) @ vk).pow(2).sum()
    assert reg.penalty().item() == pytest.approx(reference.item(), rel=1e-9)
    assert reference.item() == pytest.approx(direct.item(), rel=1e-9)
    assert torch.allclose(sref, torch.diag(s[:k]), atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_is_l2_to_init(shape):
    params = _params([shape])
    w0 = next(iter(params.values())).detach().clone()
    reg = RPSFTRegularizer(compute_bases(params, min(shape)), lam=2.0)
    _perturb(params)
    w = next(iter(params.values())).detach()
    assert reg.penalty().item() == pytest.approx(2.0 * (w - w0).pow(2).sum().item(), rel=1e-12)
    reg.add_grad_()
    assert torch.allclose(next(iter(params.values())).grad, 4.0 * (w - w0), atol=1e-12)
    # a fraction of 1.0 and an int above the rank both mean full rank
    assert resolve_k(1.0, shape) == resolve_k(10_000, shape) == min(shape)


def test_k_zero_is_no_penalty():
    params = _params(SHAPES)
    reg = RPSFTRegularizer(compute_bases(params, 0), lam=5.0)
    _perturb(params)
    assert reg.penalty().item() == 0.0
    reg.add_grad_()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in params.values())


def test_fractional_k_resolves_per_matrix():
    bases = compute_bases(_params([(40, 16), (24, 24)]), 0.25)
    assert sorted(bases.ks.values()) == [4, 6]
    with pytest.raises(ValueError, match="k: a fractional k must lie in"):
        compute_bases(_params([(8, 8)]), 1.5)
    with pytest.raises(ValueError, match="k: must be >= 0"):
        compute_bases(_params([(8, 8)]), -1)


def test_period_skips_steps():
    params = _params(SHAPES)
    reg = RPSFTRegularizer(compute_bases(params, 3), lam=1.0, period=3)
    _perturb(params)
    assert reg.add_grad_(step=1) is None
    assert all(p.grad is None for p in params.values())
    assert reg.add_grad_(step=3) > 0


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError, match="lam: lambda must be >= 0"):
        RPSFTRegularizer(compute_bases(_params(SHAPES), 2), lam=-1.0)


def test_once_per_step_equals_per_microbatch_autograd_under_accumulation():
    """Adding lam*R to each micro-batch loss (scaled by 1/accum) == adding the closed form once per step."""
    torch.manual_seed(0)
    accum, lam, k = 4, 0.5, 3
    layer = nn.Linear(12, 10, bias=False).double()
    xs, ys = torch.randn(accum, 5, 12, dtype=torch.float64), torch.randn(accum, 5, 10, dtype=torch.float64)
    params = {"w": layer.weight}
    reg = RPSFTRegularizer(compute_bases(params, k), lam=lam)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))

    def task(i):
        return (layer(xs[i]) - ys[i]).pow(2).mean()

    for i in range(accum):  # the reference implementation: penalty inside every micro-batch loss
        ((task(i) + reg.penalty()) / accum).backward()
    per_microbatch = layer.weight.grad.clone()
    layer.weight.grad = None
    for i in range(accum):  # rpsft: task only, then the closed form once
        (task(i) / accum).backward()
    reg.add_grad_()
    assert torch.allclose(layer.weight.grad, per_microbatch, rtol=1e-12, atol=1e-14)


def test_rpsft_lora_penalizes_effective_weight():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(16, 24, bias=False))
    base = base.double()
    with torch.no_grad():
        base.proj.weight.copy_(decaying_matrix(24, 16))
    selection = {"proj.weight": base.proj.weight}
    bases = compute_bases(selection, 4)
    w0 = base.proj.weight.detach().clone()
    model = get_peft_model(
        base, LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], init_lora_weights=False)
    )
    reg = RPSFTRegularizer(bases, lam=1.5, lora=find_lora_parts(model, ["proj.weight"]))
    lora = reg.lora["proj.weight"]
    u, v = bases.entries["proj.weight"].u, bases.entries["proj.weight"].v
    w_eff = w0 + lora.scaling * lora.b @ lora.a
    expected = 1.5 * (u.T @ (w_eff - w0) @ v).pow(2).sum()
    penalty = reg.penalty()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-10) and penalty.item() > 0
    penalty.backward()
    grads = (lora.a.grad.clone(), lora.b.grad.clone())
    lora.a.grad = lora.b.grad = None
    reg.add_grad_()
    assert torch.allclose(lora.a.grad, grads[0], rtol=1e-10) and torch.allclose(
        lora.b.grad, grads[1], rtol=1e-10
    )
    assert base.proj.base_layer.weight.grad is None  # the frozen base gets no gradient


def test_stationary_drift_obeys_bound_and_falls_with_lambda():
    """Least squares + RPSFT solved to stationarity: ||Uk^T (W-W0) Vk|| <= ||grad f|| / (2 lam) (Prop. C.2)."""
    torch.manual_seed(0)
    m, n, k = 12, 10, 4
    w0 = decaying_matrix(m, n, decay=0.7)
    x = torch.randn(64, n, dtype=torch.float64)
    y = x @ (w0 + 0.5 * torch.randn(m, n, dtype=torch.float64)).T  # a task that wants W far from W0
    drifts = []
    for lam in (0.01, 0.1, 1.0, 10.0):
        w = nn.Parameter(w0.clone())
        reg = RPSFTRegularizer(compute_bases({"w": w}, k), lam=lam)
        opt = torch.optim.LBFGS(
            [w], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = (x @ w.T - y).pow(2).mean() + reg.penalty()
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        w_star = w.detach().clone().requires_grad_(True)
        (task_grad,) = torch.autograd.grad((x @ w_star.T - y).pow(2).mean(), w_star)
        drift = reg.drift()["w"]
        bound = task_grad.norm().item() / (2 * lam)
        assert drift <= bound * (1 + 1e-6) + 1e-10
        drifts.append(drift)
    assert all(a > b for a, b in zip(drifts, drifts[1:]))

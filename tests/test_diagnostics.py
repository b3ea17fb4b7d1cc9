"""Diagnostics (paper App. C.5, F): the core's energy rank rule, and rpsft.evaluation.diagnostics' rotation,
first-order signal, hidden drift, entropy and the ``rpsft diagnose`` run."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PAPER_DATA
from rpsft.core.data import collate_features, demo_math_examples
from rpsft.core.k_spec import AutoK, is_auto_k, parse_k_spec
from rpsft.core.models import tiny_model
from rpsft.core.prompts import PromptExample, gradient_features, read_prompt_examples
from rpsft.core.rank_rule import (
    EnergyAccumulator,
    energy_curves,
    gradient_energy,
    lm_sample_losses,
    per_sample_gradients,
    resolve_auto_k,
)
from rpsft.evaluation.diagnostics import (
    centroid_drift,
    dataset_gradients,
    first_order_signal,
    generation_entropy,
    kde,
    left_subspaces,
    matrix_rotation,
    pca_2d,
    pooled_hidden_states,
    principal_angles,
    protected_drift,
    rankwise_rotation,
    rotation_metrics,
    rotation_summary,
)
from torch import nn
from typer.testing import CliRunner

Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads competing with other processes
    made these tests (and eigh/SVD in particular) several times slower; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orthogonal(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def _svd_parts(m=48, n=40, seed=0):
    """U (m x m), distinct singular values s (R), V (n x R): a matrix with a clear gap at every index."""
    r = min(m, n)
    u, v = _orthogonal(m, seed), _orthogonal(n, seed + 1)[:, :r]
    s = 0.93 ** torch.arange(r, dtype=torch.float64)
    return u, s, v


def _givens_left(u, k, angles):
    """Rotate u_i towards u_{k+i} by angles[i] (i < len(angles)): orthonormal, principal angles = angles."""
    out = u.clone()
    for i, theta in enumerate(angles):
        c, s = math.cos(theta), math.sin(theta)
        a, b = u[:, i].clone(), u[:, k + i].clone()
        out[:, i], out[:, k + i] = c * a + s * b, -s * a + c * b
    return out


def _compose(u, s, v):
    return (u[:, : s.numel()] * s) @ v.T


# --------------------------------------------------------------------------------------------- k specs


def test_parse_k_spec():
    assert parse_k_spec("auto") == AutoK(0.2)
    assert parse_k_spec("auto@0.3") == AutoK(0.3)
    assert parse_k_spec("AUTO@30%") == AutoK(0.3)
    assert parse_k_spec(64) == 64 and parse_k_spec("64") == 64
    assert parse_k_spec(0.05) == 0.05 and parse_k_spec("0.05") == 0.05
    assert is_auto_k("auto@0.5") and is_auto_k(AutoK()) and not is_auto_k(64)
    assert str(parse_k_spec("auto@0.3")) == "auto@0.3"
    for bad in ("auto@0", "auto@1.5", "auto@x", "fast", -1, 1.5, True):
        with pytest.raises(ValueError, match="k: "):
            parse_k_spec(bad)
    # Not-auto specs pass through resolve_auto_k without touching the model.
    assert resolve_auto_k(None, None, 128) == 128
    with pytest.raises(ValueError, match="needs OOD prompts"):
        resolve_auto_k(nn.Linear(2, 2), None, "auto")


# --------------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("method", ["exact", "gram"])
@pytest.mark.parametrize("degrees", [30.0, 1.0, 1e-3])
def test_planted_left_rotation_reports_its_angle(method, degrees):
    u, s, v = _svd_parts()
    k = 16
    w_base = _compose(u, s, v)
    w_tuned = _compose(_givens_left(u, k, [math.radians(degrees)] * k), s, v)
    result = matrix_rotation(w_base, w_tuned, top_k=k, method=method)
    assert result.k == k and not result.trivial
    assert result.mean_deg == pytest.approx(degrees, rel=1e-6, abs=1e-9)
    # Identical weights: exactly 0; a rotation of the right singular vectors only: no left rotation.
    assert matrix_rotation(w_base, w_base.clone(), top_k=k, method=method).mean_deg == 0.0
    w_right = w_base @ _orthogonal(40, 7).T  # an orthogonal change of the right singular vectors only
    assert matrix_rotation(w_base, w_right, top_k=k, method=method).mean_deg < 1e-6


def test_small_angles_are_stable_in_float32():
    """arccos(cos) of a 0.01 degree angle is rounding noise in float32; the atan2(sin, cos) form is not."""
    u, _, _ = _svd_parts()
    theta = math.radians(0.01)
    a = u[:, :8]
    b = _givens_left(u, 8, [theta] * 8)[:, :8]
    naive = torch.arccos(torch.linalg.svdvals(a.float().T @ b.float()).clamp(max=1.0))
    stable = principal_angles(a.float(), b.float())
    assert abs(naive.mean().item() - theta) > 0.2 * theta  # the naive formula loses the angle
    assert torch.allclose(stable.double(), torch.full((8,), theta, dtype=torch.float64), rtol=1e-2)


def test_rankwise_curve_is_the_running_mean_and_monotone():
    u, s, v = _svd_parts()
    k = 16
    angles = torch.linspace(0.5, 20.0, k, dtype=torch.float64)  # rotation grows with the singular index
    w_base = _compose(u, s, v)
    w_tuned = _compose(_givens_left(u, k, [math.radians(a) for a in angles]), s, v)
    curve = rankwise_rotation(w_base, w_tuned, top_k=k, ranks="all", method="exact")
    assert curve["ranks"] == list(range(1, k + 1))
    expected = (angles.cumsum(0) / torch.arange(1, k + 1)).tolist()
    assert curve["mean_deg"] == pytest.approx(expected, rel=1e-6)
    assert all(b >= a - 1e-9 for a, b in zip(curve["mean_deg"], curve["mean_deg"][1:]))
    # Only directions 8.. rotate: the prefixes up to 8 see nothing, later ones a positive, growing mean.
    late = [0.0] * 8 + [math.radians(10.0)] * 8
    w_late = _compose(_givens_left(u, k, late), s, v)
    curve = rankwise_rotation(w_base, w_late, top_k=k, ranks="all", method="exact")["mean_deg"]
    assert max(curve[:8]) < 1e-6 and all(b > a for a, b in zip(curve[7:], curve[8:]))
    assert curve[-1] == pytest.approx(5.0, rel=1e-6)


def test_rotation_summary_is_layerwise_and_skips_trivial_matrices(smol_tokenizer):
    base = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # plant a 5 degree rotation of the top-16 left subspace of layer 1's q_proj
        w = base.get_parameter(Q1).double()
        u, s, vh = torch.linalg.svd(w)
        rotated = _givens_left(u, 16, [math.radians(5.0)] * 16)
        tuned.get_parameter(Q1).copy_(((rotated[:, :64] * s) @ vh).float())
    summary = rotation_summary(base, tuned, "attn", top_k=16)
    assert summary["per_matrix"][Q1] == pytest.approx(5.0, abs=1e-3)
    assert summary["per_layer"][1] == pytest.approx(5.0 / 4, abs=1e-3)  # mean over q, k, v, o
    assert summary["per_layer"][0] == 0.0 and summary["per_layer"][2] == 0.0
    assert summary["n_matrices"] == 12 and summary["n_unchanged"] == 11 and not summary["trivial"]
    assert summary["update_norm"] > 0
    cached = rotation_summary(
        None, tuned, "attn", top_k=16, base_subspaces=left_subspaces(base, "attn", top_k=16)
    )
    assert cached["per_matrix"][Q1] == pytest.approx(5.0, abs=1e-3) and cached["mean_deg"] < 0.5
    metrics = rotation_metrics(summary)
    assert (
        metrics["rotation/layer_01_deg"] == pytest.approx(1.25, abs=1e-3) and "rotation/type_q_deg" in metrics
    )
    # K = m (the 32-row k/v projections at K = 512): U spans R^m, reported as trivial and left out.
    wide = rotation_summary(base, tuned, "attn", top_k=512)
    assert any(".k_proj." in n for n in wide["trivial"]) and all(
        ".k_proj." not in n for n in wide["per_matrix"]
    )


def test_protected_drift_matches_the_regularizers_drift(tmp_path, smol_tokenizer):
    from rpsft.core.config import TrainConfig
    from rpsft.core.train import train

    base = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    cfg = TrainConfig.model_validate(
        dict(
            data="demo-math:8",
            max_length=96,
            batch_size=2,
            max_steps=2,
            learning_rate=1e-3,
            method="rpsft",
            k=4,
            layers="attn",
            basis_method="exact",
            output_dir=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "cache"),
            save_model=False,
        )
    )
    result = train(cfg, model=copy.deepcopy(base), tokenizer=smol_tokenizer, progress=False)
    drift = protected_drift(base, result.model, "attn", k=4, method="exact")
    assert set(drift["per_matrix"]) == set(result.drift)
    for name, value in result.drift.items():
        assert drift["per_matrix"][name] == pytest.approx(value, rel=1e-3, abs=1e-7)
    assert drift["mean"] > 0 and protected_drift(base, base, "attn", k=4)["max"] == 0.0


# --------------------------------------------------------------------------------------------- energy


def test_energy_of_block_gradients_is_complete_at_r_and_prefix_sums_match_the_definition():
    u, s, v = _svd_parts()
    w = _compose(u, s, v)
    gen = torch.Generator().manual_seed(3)
    r = 7
    acc = EnergyAccumulator(u[:, :40], v)
    for _ in range(4):  # G_t = dY^T X inside the top-r x r block
        dy = torch.randn(5, r, generator=gen, dtype=torch.float64) @ u[:, :r].T
        x = torch.randn(5, r, generator=gen, dtype=torch.float64) @ v[:, :r].T
        acc.add_factors(dy, x)
    y = acc.curve()
    assert y[r - 1].item() == pytest.approx(1.0, abs=1e-12) and y[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert y[r - 2].item() < 0.999
    # Arbitrary gradients: factored accumulation == explicit ||U_r^T G V_r||^2 / ||G||^2 at every r.
    uu, _, vvh = torch.linalg.svd(w, full_matrices=False)
    grads = [torch.randn(48, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    factored, explicit = EnergyAccumulator(uu, vvh.T), EnergyAccumulator(uu, vvh.T)
    for g in grads:
        q, rr = torch.linalg.qr(g)  # G = Q R: any factorization dY^T X works
        factored.add_factors(q.T, rr)
        explicit.add_gradient(g)
    total = sum(float(g.square().sum()) for g in grads)
    direct = [
        sum(float((uu[:, :k].T @ g @ vvh[:k].T).square().sum()) for g in grads) / total for k in range(1, 41)
    ]
    assert factored.curve().tolist() == pytest.approx(direct, rel=1e-10)
    assert explicit.curve().tolist() == pytest.approx(direct, rel=1e-10)


class _Probe(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def test_rank_rule_recovers_a_planted_rank_through_the_hooks():
    """Per-sample gradients sum_i a_ti u_i v_i^T (+ an off-block part) with 19% of the energy in the first
    10 diagonal directions and 2% in the 11th: the 20% rule must answer r = 11 (of R = 40)."""
    u, s, v = _svd_parts()
    model = _Probe(_compose(u, s, v))
    big_r, planted = 40, 11
    energy = torch.zeros(big_r + 1, dtype=torch.float64)
    energy[: planted - 1] = 0.19 / (planted - 1)
    energy[planted - 1] = 0.02
    energy[planted:big_r] = 0.69 / (big_r - planted)
    energy[big_r] = 0.10  # u_40 v_1^T: outside every strict block below R
    shares = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # split over three samples
    x = torch.zeros(3, big_r + 1, 40, dtype=torch.float64)
    c = torch.zeros(3, big_r + 1, 48, dtype=torch.float64)
    for t in range(3):
        for i in range(big_r + 1):
            sign = 1.0 if (t + i) % 2 else -1.0
            x[t, i] = v[:, i] if i < big_r else v[:, 0]
            c[t, i] = sign * math.sqrt(energy[i] * shares[t]) * (u[:, i] if i < big_r else u[:, big_r - 1])
    batches = [{"x": x[:2], "c": c[:2]}, {"x": x[2:], "c": c[2:]}]

    def loss_fn(m, batch):  # per-sample losses; dL_t/dW = sum_s c_ts x_ts^T
        return (batch["c"] * m(batch["x"])).sum(dim=(1, 2))

    report = gradient_energy(model, ["proj.weight"], batches, loss_fn=loss_fn, valid_fn=None)
    curve = report.curves["proj.weight"]
    assert curve.n_samples == 3 and curve.rank == big_r
    assert curve.energy_at(planted - 1) == pytest.approx(0.19) and curve.energy_at(planted) == pytest.approx(
        0.21
    )
    assert curve.suggested_rank == planted and curve.reached
    assert report.k_fraction == pytest.approx(planted / big_r)
    assert curve.block_fraction == pytest.approx((planted / big_r) ** 2)
    full = gradient_energy(model, ["proj.weight"], batches, loss_fn=loss_fn, valid_fn=None, target=0.95)
    assert full.curves["proj.weight"].suggested_rank == big_r  # only the full block holds the off-block 10%


def test_hook_per_sample_gradients_equal_single_sample_backward_passes(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0).double()
    examples = demo_math_examples(3, seed=1)
    features = gradient_features(examples, smol_tokenizer, 96)
    assert len({len(f["input_ids"]) for f in features}) > 1  # padding is exercised
    batch = collate_features(features, smol_tokenizer.pad_token_id)
    names = [Q1, "model.layers.0.mlp.gate_proj.weight"]
    hooked = per_sample_gradients(model, batch, names)
    params = dict(model.named_parameters())
    loop = {name: [] for name in names}
    for feature in features:
        model.zero_grad()
        lm_sample_losses(model, collate_features([feature], smol_tokenizer.pad_token_id)).sum().backward()
        for name in names:
            loop[name].append(params[name].grad.clone())
    for name in names:
        expected = torch.stack(loop[name])
        assert torch.allclose(hooked[name], expected, rtol=1e-9, atol=1e-12), name
    # The energy pipeline (factored, never forming G_t) equals the definition on the looped gradients.
    report = energy_curves(model, smol_tokenizer, examples, names, batch_size=2, max_length=96)
    for name in names:
        uu, _, vvh = torch.linalg.svd(params[name].detach(), full_matrices=False)
        grads = loop[name]
        total = sum(float(g.square().sum()) for g in grads)
        direct = [
            sum(float((uu[:, :k].T @ g @ vvh[:k].T).square().sum()) for g in grads) / total
            for k in range(1, uu.shape[1] + 1)
        ]
        assert report.curves[name].y == pytest.approx(direct, rel=1e-8, abs=1e-12), name
    k, details = resolve_auto_k(model, smol_tokenizer, "auto@0.3", examples, matrices=Q1, return_report=True)
    assert k == pytest.approx(details.curves[Q1].suggested_rank / 64) and 0 < k <= 1
    assert details.curves[Q1].energy_at(details.curves[Q1].suggested_rank) >= 0.3


# --------------------------------------------------------------------------------------------- first order


def test_first_order_signal_has_the_sign_of_a_planted_step(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0).double()
    examples = demo_math_examples(3, seed=2)
    grads = dataset_gradients(model, smol_tokenizer, examples, "attn", batch_size=2, max_length=96)
    # Independent: average of single-sample backward passes.
    params = dict(model.named_parameters())
    manual = {name: torch.zeros_like(params[name]) for name in grads}
    for feature in gradient_features(examples, smol_tokenizer, 96):
        model.zero_grad()
        lm_sample_losses(model, collate_features([feature], smol_tokenizer.pad_token_id)).sum().backward()
        for name in manual:
            manual[name] += params[name].grad / len(examples)
    for name in grads:
        assert torch.allclose(grads[name].double(), manual[name], rtol=1e-5, atol=1e-7)  # float32 log-softmax
    eta = 1e-2
    descent = {name: params[name].detach() - eta * manual[name] for name in grads}
    ascent = {name: params[name].detach() + eta * manual[name] for name in grads}
    down, up = first_order_signal(grads, model, descent), first_order_signal(grads, model, ascent)
    for name in grads:
        expected = -eta * float(manual[name].square().sum())
        assert down["per_matrix"][name] == pytest.approx(expected, rel=1e-5)
        assert up["per_matrix"][name] == pytest.approx(-expected, rel=1e-5)
    assert down["mean"] < 0 and all(v < 0 for v in down["per_layer"].values())
    assert up["mean"] > 0 and set(down["per_layer"]) == {0, 1, 2}
    assert first_order_signal(grads, model, model)["mean"] == 0.0


# --------------------------------------------------------------------------------------------- hidden drift


def test_hidden_drift_of_a_model_against_itself_is_zero(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    examples = demo_math_examples(4, seed=3)
    states = pooled_hidden_states(model, smol_tokenizer, examples, batch_size=4)
    same = pooled_hidden_states(copy.deepcopy(model), smol_tokenizer, examples, batch_size=4)
    other = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    with torch.no_grad():
        other.get_parameter("model.layers.2.mlp.down_proj.weight").mul_(3.0)
    moved = pooled_hidden_states(other, smol_tokenizer, examples, batch_size=4)
    drift = centroid_drift({"base": states, "same": same, "moved": moved})
    assert drift["base"] == 0.0 and drift["same"] == 0.0 and drift["moved"] > 1e-3
    # Independent pooling of one prompt, unbatched: masked mean over its own tokens.
    from rpsft.core.prompts import prompt_token_ids

    ids = torch.tensor([prompt_token_ids(examples[:1], smol_tokenizer, 512)[0]])
    with torch.no_grad():
        direct = model.model(input_ids=ids).last_hidden_state.mean(1)[0]
    assert torch.allclose(states[0], direct, atol=1e-5)
    picture = pca_2d({"base": states, "same": same, "moved": moved})
    assert picture["distance"]["base"] == 0.0 and picture["distance"]["same"] == pytest.approx(0.0, abs=1e-9)
    assert picture["distance"]["moved"] > 0 and len(picture["points"]["moved"]) == 4
    assert 0.0 <= sum(picture["explained"]) <= 1.0 + 1e-9


# --------------------------------------------------------------------------------------------- entropy


def _manual_greedy_entropies(model, prompt_ids, steps):
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].float().double()  # generate hands out float32 logits
            logp = torch.log_softmax(logits, -1)
            out.append(float(-(logp.exp() * logp).sum()))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return out, int(ids[0, len(prompt_ids)])


def test_entropy_follows_the_greedy_path_and_stops_at_eos(smol_tokenizer):
    from rpsft.core.prompts import prompt_token_ids

    model = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0).double()
    with torch.no_grad():  # sharpen the random model so the entropies differ between prompts
        model.get_parameter("model.embed_tokens.weight").mul_(20.0)
    examples = demo_math_examples(3, seed=4)
    result = generation_entropy(model, smol_tokenizer, examples, max_new_tokens=5, batch_size=3)
    ids = prompt_token_ids(examples, smol_tokenizer, 512)
    for j in range(3):
        entropies, _ = _manual_greedy_entropies(model, ids[j], 5)
        assert result["lengths"][j] == 5
        assert result["per_prompt"][j] == pytest.approx(sum(entropies) / 5, rel=1e-6)
    # Make the first greedy token of prompt 0 an end-of-sequence token: its decoding stops after one step.
    entropies, first = _manual_greedy_entropies(model, ids[0], 1)
    model.generation_config.eos_token_id = [first]
    stopped = generation_entropy(model, smol_tokenizer, examples[:1], max_new_tokens=5)
    assert stopped["lengths"] == [1] and stopped["per_prompt"][0] == pytest.approx(entropies[0], rel=1e-6)


def test_kde_uses_the_papers_bandwidth():
    values = np.array([0.3, 0.5, 0.55, 0.9, 1.4])
    grid, density = kde(values, points=2001)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=2e-3)
    h = 1.06 * values.std(ddof=1) * len(values) ** -0.2
    at = np.array([0.5])
    _, one = kde(values, at)
    expected = np.exp(-0.5 * ((0.5 - values) / h) ** 2).sum() / (len(values) * h * math.sqrt(2 * math.pi))
    assert one[0] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- CLI


def test_import_does_not_pull_ray_or_mlflow():
    code = (
        "import sys, rpsft.evaluation.diagnostics, rpsft.evaluation.diagnostics.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_core_rank_rule_needs_neither_the_analysis_nor_matplotlib():
    code = (
        "import sys, rpsft.core.rank_rule, rpsft.core.prompts, rpsft.core.config, rpsft.core.train\n"
        "bad = [m for m in sys.modules if m.startswith(('rpsft.evaluation', 'rpsft.sweeps', 'matplotlib'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_diagnostic_follows_the_protocol():
    from rpsft.evaluation.diagnostics.catalog import DIAGNOSTICS
    from rpsft.evaluation.diagnostics.protocol import Diagnostic
    from rpsft.evaluation.diagnostics.run import ALL_DIAGNOSTICS, parse_what

    assert [d.name for d in DIAGNOSTICS] == list(ALL_DIAGNOSTICS) == list(parse_what("all"))
    for diagnostic in DIAGNOSTICS:
        assert issubclass(diagnostic, Diagnostic)
        assert diagnostic.start is not Diagnostic.start and diagnostic.results is not Diagnostic.results
    assert parse_what("entropy,first_order,rank") == ("energy", "first-order", "entropy")


def test_figures_without_matplotlib_name_the_extra(tmp_path, smol_tokenizer, monkeypatch):
    from rpsft.evaluation.diagnostics import plots
    from rpsft.evaluation.diagnostics.run import diagnose

    base = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    base.save_pretrained(tmp_path / "same")
    smol_tokenizer.save_pretrained(tmp_path / "same")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert not plots.available()
    with pytest.raises(plots.MissingPlotExtra, match=r"pip install 'rpsft\[diagnostics\]'"):
        plots.plot_rotation_layerwise({}, tmp_path / "x.png")
    out = tmp_path / "diag"
    results = diagnose(
        (base, smol_tokenizer), [str(tmp_path / "same")], what="rotation", top_k=16, out_dir=out
    )
    written = json.loads((out / "diagnostics.json").read_text())
    assert written["figures"] == [] and "rpsft[diagnostics]" in written["figures_skipped"]
    assert results["rotation"]["same"]["mean_deg"] == 0.0 and not list(out.glob("*.png"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_rows_of_the_paper_format(tmp_path):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "x?"}], "solution": "x is 3.", "reward_model": {}},
            {"prompt": [{"role": "user", "content": "write"}], "reward_model": {"ground_truth": ""}},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )
    rows = read_prompt_examples(path)
    assert [r.target for r in rows] == ["The answer is \\boxed{2}.", "x is 3.", None, "b"]
    assert rows[3].messages == [{"role": "user", "content": "a"}]
    assert read_prompt_examples(path, limit=2) == rows[:2]
    assert isinstance(rows[0], PromptExample)


def _paper_rows(n, answers=True):
    return [
        {
            "prompt": [
                {"role": "system", "content": "Please reason step by step."},
                {"role": "user", "content": f"What is {i} + {i + 2}?"},
            ],
            "reward_model": {"ground_truth": str(2 * i + 2) if answers else ""},
        }
        for i in range(n)
    ]


def test_diagnose_cli_on_tiny_models(tmp_path, smol_tokenizer):
    from rpsft.cli import app

    base = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0)
    rotated = copy.deepcopy(base)
    with torch.no_grad():
        w = base.get_parameter(Q1).double()
        u, s, vh = torch.linalg.svd(w)
        rotated.get_parameter(Q1).copy_(((_givens_left(u, 16, [math.radians(5.0)] * 16) * s) @ vh).float())
    for name, model in (("base", base), ("rot", rotated), ("same", base)):
        model.save_pretrained(tmp_path / name)
        smol_tokenizer.save_pretrained(tmp_path / name)
    id_data = _write_jsonl(tmp_path / "id_math.jsonl", _paper_rows(3))
    ood_data = _write_jsonl(tmp_path / "ood_chat.jsonl", _paper_rows(3, answers=False))
    out = tmp_path / "diag"
    args = [
        "diagnose",
        "--base",
        str(tmp_path / "base"),
        "--tuned",
        str(tmp_path / "rot"),
        str(tmp_path / "same"),
    ]
    args += ["--data", str(id_data), "--ood-data", str(ood_data), "--out", str(out), "--limit", "2"]
    args += ["--max-new-tokens", "3", "--top-k", "16", "--layers", "attn", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rot@16 deg" in result.output and "drift[ood_chat]" in result.output
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["tuned"] == {"rot": str(tmp_path / "rot"), "same": str(tmp_path / "same")}
    assert report["rotation"]["rot"]["per_matrix"][Q1] == pytest.approx(5.0, abs=1e-3)
    assert report["rotation"]["same"]["mean_deg"] == 0.0
    assert report["rotation_rankwise"]["models"]["rot"]["mean_deg"][-1] == pytest.approx(5.0, abs=1e-3)
    assert report["energy"]["matrices"][Q1]["rank"] == 64 and report["energy"]["datasets"] == ["ood_chat"]
    for dataset in ("id_math", "ood_chat"):
        assert report["hidden"][dataset]["distance"]["same"] == 0.0
        assert report["hidden"][dataset]["distance"]["rot"] > 0.0
        assert report["first_order"]["same"][dataset]["mean"] == 0.0
        assert len(report["entropy"][dataset]["base"]["per_prompt"]) == 2
    assert report["datasets"]["ood_chat"]["role"] == "ood"
    # the test environment has the diagnostics extra (matplotlib): every diagnostic's figures, in --what order
    assert report["figures"] == [
        "energy.png",
        "rotation_layerwise.png",
        "rotation_rankwise.png",
        "first_order.png",
        "hidden_pca.png",
        "entropy_kde.png",
    ]
    assert set(report["timings"]) == {
        "load",
        "energy",
        "rotation",
        "first-order",
        "hidden",
        "entropy",
        "figures",
    }
    bad = CliRunner().invoke(app, ["diagnose", "--base", str(tmp_path / "base"), "--what", "nonsense"])
    assert bad.exit_code == 2 and "what: unknown diagnostic" in bad.output


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_rpsft_rotates_less_than_sft_on_smollm2(tmp_path, smol_tokenizer):
    """Brief SFT and RPSFT fine-tunes of SmolLM2-135M (same data, seed, steps, learning rate), then
    ``rpsft diagnose`` on both: the penalized matrices rotate less under RPSFT."""
    from rpsft.core.config import TrainConfig
    from rpsft.core.models import load_model
    from rpsft.core.train import train

    from rpsft.cli import app

    aime = PAPER_DATA / "id" / "aime-25.jsonl"
    gpqa = PAPER_DATA / "ood" / "gpqa_test.jsonl"
    if not (aime.exists() and gpqa.exists()):
        pytest.skip("paper data not found")
    layers = {"types": ["q", "o"], "layers": "0:3"}
    common = dict(
        data="demo-math:8",
        max_length=96,
        batch_size=2,
        grad_accum=1,
        max_steps=4,
        learning_rate=1e-4,
        lr_scheduler="constant",
        layers=layers,
        basis_method="gram",
        seed=0,
        cache_dir=str(tmp_path / "cache"),  # bases cache (the model is passed in)
        save_model=True,
    )
    runs = {
        "sft": dict(method="sft"),
        "rpsft": dict(method="rpsft", k=128, lam=100.0),  # k > K = 64: the measured subspace is protected
    }
    for name, overrides in runs.items():
        cfg = TrainConfig.model_validate({**common, **overrides, "output_dir": str(tmp_path / name)})
        model, _ = load_model("smollm2-135m-instruct")
        train(cfg, model=model, tokenizer=smol_tokenizer, progress=False)
        del model
    out = tmp_path / "diag"
    args = ["diagnose", "--base", "smollm2-135m-instruct", "--tuned", str(tmp_path / "sft" / "model")]
    args += [
        str(tmp_path / "rpsft" / "model"),
        "--data",
        str(aime),
        "--ood-data",
        str(gpqa),
        "--out",
        str(out),
    ]
    args += ["--limit", "2", "--max-new-tokens", "4", "--max-length", "128", "--top-k", "64"]
    args += ["--layers", "{types: [q, o], layers: '0:3'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    print(result.output)
    report = json.loads((out / "diagnostics.json").read_text())
    sft, rpsft = report["rotation"]["sft"], report["rotation"]["rpsft"]
    assert sft["n_matrices"] == rpsft["n_matrices"] == 6 and sft["n_unchanged"] == 0
    assert 0 < rpsft["mean_deg"] < sft["mean_deg"]
    curve = report["energy"]["matrices"][Q1]
    assert 1 <= curve["suggested_rank"] <= 576 and curve["energy_at_suggested"] >= 0.2
    assert all(b >= a - 1e-12 for a, b in zip(curve["y"], curve["y"][1:]))
    assert report["hidden"]["gpqa_test"]["distance"]["sft"] > 0

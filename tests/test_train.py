import json

import pytest
import torch
from rpsft.core.bases import compute_bases
from rpsft.core.config import ConfigError, TrainConfig, load_train_config
from rpsft.core.data import DataError, SFTCollator, build_sft_dataset, demo_math_examples
from rpsft.core.models import load_model, tiny_model
from rpsft.core.regularizer import RPSFTRegularizer
from rpsft.core.selection import select_matrices
from rpsft.core.train import train
from rpsft.core.trainer import RPSFTCallback, RPSFTTrainer
from transformers import Trainer, TrainingArguments


def _config(tmp_path, **overrides):
    base = dict(
        data="demo-math:16",
        max_length=96,
        batch_size=2,
        grad_accum=2,
        max_steps=3,
        learning_rate=1e-3,
        k=4,
        layers="all",
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        seed=0,
    )
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _tiny(tokenizer, arch="llama"):
    return tiny_model(arch, vocab_size=len(tokenizer), seed=0)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_k0_rpsft_follows_the_sft_trajectory(tmp_path, smol_tokenizer):
    runs = {}
    for method, k in (("sft", 4), ("rpsft", 0)):
        cfg = _config(tmp_path / method, method=method, k=k, save_model=False)
        runs[method] = _weights(
            train(cfg, model=_tiny(smol_tokenizer), tokenizer=smol_tokenizer, progress=False).model
        )
    changed = [n for n in runs["sft"] if not torch.equal(runs["sft"][n], _weights(_tiny(smol_tokenizer))[n])]
    assert changed  # training moved the weights
    assert all(torch.equal(runs["sft"][n], runs["rpsft"][n]) for n in runs["sft"])


def test_drift_falls_with_lambda_within_the_stationary_bound(tmp_path, smol_tokenizer):
    """SGD on a tiny LM: drift ||Uk^T (W - W0) Vk|| falls as lambda grows and stays under ||grad f|| / (2 lambda)."""
    from rpsft.core.losses import sft_loss, token_logprobs

    batch = SFTCollator(smol_tokenizer.pad_token_id)(
        list(build_sft_dataset(demo_math_examples(8), smol_tokenizer, 96))
    )
    drift_means = []
    for lam in (0.1, 1.0, 10.0):
        cfg = _config(
            tmp_path / str(lam),
            method="rpsft",
            k=4,
            lam=lam,
            layers="attn",
            data="demo-math:8",
            batch_size=8,
            grad_accum=1,
            max_steps=30,
            learning_rate=0.05,
            optimizer="sgd",
            lr_scheduler="constant",
            max_grad_norm=0.0,
            save_model=False,
        )
        result = train(cfg, model=_tiny(smol_tokenizer), tokenizer=smol_tokenizer, progress=False)
        model = result.model
        model.zero_grad()
        logp, mask = token_logprobs(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        sft_loss(logp, mask).backward()
        selection = select_matrices(model, "attn")
        for name, param in selection.items():
            assert result.drift[name] <= param.grad.norm().item() / (2 * lam)
        drift_means.append(result.metrics["drift_mean"])
    assert drift_means[0] > drift_means[1] > drift_means[2] > 0


@pytest.mark.parametrize("method", ["sft", "rpsft", "l2-init", "dft", "iw", "lora", "rpsft-lora", "osf"])
def test_every_method_trains_and_writes_a_loadable_checkpoint(tmp_path, smol_tokenizer, method):
    cfg = _config(tmp_path, method=method, max_steps=2, layers="attn")
    model = _tiny(smol_tokenizer)
    before = _weights(model)
    result = train(cfg, model=model, tokenizer=smol_tokenizer, progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["config"]["method"] == method
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in metrics["log_history"] if "loss" in e)
    reloaded, _ = load_model(tmp_path / "out" / "model")
    after = dict(reloaded.named_parameters())
    assert set(after) == set(before)  # adapters were merged back into plain weights
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])
    if method in ("rpsft", "l2-init", "rpsft-lora"):
        logged = [e for e in metrics["log_history"] if "rpsft/penalty" in e]
        assert logged and logged[-1]["rpsft/penalty"] > 0
        assert metrics["drift"] and result.drift
        history = metrics["drift_history"]
        assert [h["step"] for h in history] == [1, 2] and set(history[-1]["drift"]) == set(metrics["drift"])
    if method in ("lora", "rpsft-lora", "osf"):  # only the selected (attention) matrices change
        down = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(after[down], before[down])


def test_callback_in_a_stock_trainer_matches_rpsft_trainer(tmp_path, smol_tokenizer):
    """Without clipping, RPSFTCallback in a plain transformers.Trainer gives the RPSFTTrainer update."""
    dataset = build_sft_dataset(demo_math_examples(8), smol_tokenizer, 96)
    results = []
    for trainer_cls in (Trainer, RPSFTTrainer):
        model = _tiny(smol_tokenizer)
        selection = select_matrices(model, "attn")
        reg = RPSFTRegularizer(compute_bases(selection, 4), lam=50.0)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_pin_memory=False,
        )
        kwargs = dict(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=SFTCollator(smol_tokenizer.pad_token_id),
        )
        if trainer_cls is Trainer:
            trainer = Trainer(**kwargs, callbacks=[RPSFTCallback(reg)])
        else:
            trainer = RPSFTTrainer(**kwargs, regularizer=reg)
        trainer.train()
        assert reg.last_step_applied == 1
        results.append(_weights(model))
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k": -1}, "k: .*must be >= 0"),
        ({"k": 1.5}, "k: .*fractional k must lie in"),
        ({"lambda": -0.5}, "lambda: .*must be >= 0"),
        ({"layers": "everything"}, "layers: .*unknown preset"),
        ({"method": "magic"}, "method: "),
        ({"basis_method": "qr"}, "basis_method: .*unknown basis method"),
        ({"batch_size": 0}, "batch_size: "),
        ({"lr_scheduler": "cosine_typo"}, "lr_scheduler: .*unknown scheduler"),
        ({"method": "osf", "k": 0}, "osf freezes the top-k subspace and needs k > 0"),
        ({"method": "l2-init", "lambda": 0}, "lambda is 0 for method 'l2-init'"),
        ({"k": "auto@2"}, "k: .*the energy target must lie in"),
        ({"k": "fast"}, "k: 'fast' is not a number"),
        ({"k": "auto", "auto_k_prompts": "/nonexistent/ood.jsonl"}, "auto_k_prompts: file .* does not exist"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_bad_config_file_is_rejected_before_anything_loads(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("method: rpsft\nk: -3\n")
    with pytest.raises(ConfigError, match=r"train.yaml: invalid configuration\n  - k: "):
        load_train_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")


def test_data_and_selection_errors_fail_before_training(tmp_path, smol_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "response": "2"}\n{"prompt": "2+2?"}\n')
    for data, message in (
        (str(empty), r"^data: no trainable examples: 0 example\(s\) given"),
        (str(bad), r"bad\.jsonl:2"),
    ):
        with pytest.raises(DataError, match=message):
            train(
                _config(tmp_path, data=data),
                model=_tiny(smol_tokenizer),
                tokenizer=smol_tokenizer,
                progress=False,
            )
    with pytest.raises(ValueError, match="layers: the selection .* matches no weight matrix"):
        train(
            _config(tmp_path, layers={"regex": "nothing_here"}),
            model=_tiny(smol_tokenizer),
            tokenizer=smol_tokenizer,
            progress=False,
        )
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, smol_tokenizer):
    """`checkpoint_every`: a run killed after step 3 of 4 restarts from checkpoint-2 (weights, AdamW state,
    scheduler, data order) and ends where an uninterrupted run ends."""
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    common = dict(method="rpsft", max_steps=4, checkpoint_every=2, save_model=False, lr_scheduler="cosine")
    whole = train(
        _config(tmp_path / "whole", **common),
        model=_tiny(smol_tokenizer),
        tokenizer=smol_tokenizer,
        progress=False,
    )
    assert whole.metrics["resumed_from_step"] == 0
    cfg = _config(tmp_path / "killed", **common)
    with pytest.raises(Killed):
        train(
            cfg,
            model=_tiny(smol_tokenizer),
            tokenizer=smol_tokenizer,
            callbacks=[KillAfter()],
            progress=False,
        )
    assert sorted(p.name for p in (tmp_path / "killed" / "out").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train(cfg, model=_tiny(smol_tokenizer), tokenizer=smol_tokenizer, progress=False)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["global_steps"] == 4
    assert [e["step"] for e in resumed.metrics["log_history"] if "loss" in e] == [1, 2, 3, 4]
    for name, value in _weights(whole.model).items():
        assert torch.allclose(value, _weights(resumed.model)[name], atol=1e-6), name


@pytest.mark.parametrize(("setting", "computed"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_training_forward_computes_in_the_resolved_precision(tmp_path, smol_tokenizer, setting, computed):
    """``mixed_precision: bf16`` autocasts the Trainer's forward during training (the matmuls return bfloat16
    while the weights stay float32); ``no`` computes in float32. Read from a hook inside the training steps."""
    import contextlib

    from rpsft.core.precision import cpu_has_native_bf16
    from transformers import TrainerCallback

    seen: list[tuple[torch.dtype, torch.dtype]] = []

    class LinearDtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            linear.register_forward_hook(
                lambda module, inputs, output: seen.append((module.weight.dtype, output.dtype))
            )

    cfg = _config(tmp_path, method="sft", mixed_precision=setting, max_steps=1, save_model=False)
    emulated = setting == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16()
    with pytest.warns(RuntimeWarning, match="emulated") if emulated else contextlib.nullcontext():
        result = train(
            cfg,
            model=_tiny(smol_tokenizer),
            tokenizer=smol_tokenizer,
            callbacks=[LinearDtypes()],
            progress=False,
        )
    assert result.metrics["mixed_precision"] == setting
    assert seen and set(seen) == {(torch.float32, computed)}


@pytest.mark.parametrize("method", ["sft", "lora"])
def test_a_mixed_precision_run_returns_the_model_it_saves(tmp_path, smol_tokenizer, method):
    """bf16 mixed precision autocasts the forward pass during training only: the returned model computes in
    float32, exactly as its checkpoint does once loaded (so it is scored like the float32 base model)."""
    import contextlib

    from rpsft.core.models import full_precision_forward
    from rpsft.core.precision import cpu_has_native_bf16

    cfg = _config(tmp_path, method=method, mixed_precision="bf16", max_steps=2, save_model=True)
    emulated = not torch.cuda.is_available() and not cpu_has_native_bf16()  # bf16 asked for where it is slow
    with pytest.warns(RuntimeWarning, match="emulated") if emulated else contextlib.nullcontext():
        result = train(cfg, model=_tiny(smol_tokenizer), tokenizer=smol_tokenizer, progress=False)
    reloaded, _ = load_model(tmp_path / "out" / "model")
    ids = torch.randint(0, len(smol_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained_logits = result.model.eval()(ids).logits
        fresh_logits = reloaded.eval()(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = reloaded(ids).logits.float()
    assert trained_logits.dtype == torch.float32
    assert torch.equal(trained_logits, fresh_logits)
    assert not torch.equal(autocast_logits, fresh_logits)  # the check can tell the two apart
    with full_precision_forward(reloaded):  # no wrapper: a no-op
        assert torch.equal(reloaded(ids).logits, fresh_logits)


def test_k_auto_is_resolved_on_the_base_model_before_training(tmp_path, smol_tokenizer):
    """``k: auto@0.3``: the energy rule runs on the untrained base model over the prompts of
    ``auto_k_prompts``, and the run trains exactly as one given the resolved rank fraction."""
    import copy

    from rpsft.core.prompts import load_prompt_examples
    from rpsft.core.rank_rule import resolve_auto_k

    base = _tiny(smol_tokenizer)
    _, prompts = load_prompt_examples("demo-math:6")
    expected = resolve_auto_k(copy.deepcopy(base), smol_tokenizer, "auto@0.3", prompts)
    common = dict(layers="attn", max_steps=2, save_model=False)
    auto = train(
        _config(tmp_path / "auto", k="AUTO@0.3", auto_k_prompts="demo-math:6", **common),
        model=base,
        tokenizer=smol_tokenizer,
        progress=False,
    )
    assert auto.metrics["config"]["k"] == "auto@0.3" and 0 < expected <= 1
    assert auto.metrics["k_resolved"] == pytest.approx(expected, rel=1e-12)
    numeric = train(
        _config(tmp_path / "numeric", k=auto.metrics["k_resolved"], **common),
        model=_tiny(smol_tokenizer),
        tokenizer=smol_tokenizer,
        progress=False,
    )
    assert numeric.metrics["k_resolved"] is None
    assert numeric.metrics["bases_bytes"] == auto.metrics["bases_bytes"]
    trained, reference = _weights(auto.model), _weights(numeric.model)
    assert all(torch.equal(trained[name], reference[name]) for name in reference)


def test_cli_train_k_auto(tmp_path, tiny_dir, smol_tokenizer):
    """``rpsft train --k auto``: the spec reaches the run, which reports the fraction the rule chose."""
    from rpsft.core.cli import app
    from rpsft.core.prompts import load_prompt_examples
    from rpsft.core.rank_rule import resolve_auto_k
    from typer.testing import CliRunner

    config = tmp_path / "train.yaml"
    config.write_text("auto_k_prompts: demo-math:4\nmax_length: 96\nbatch_size: 2\nsave_model: false\n")
    args = ["train", "--config", str(config), "--model", str(tiny_dir), "--data", "demo-math:4"]
    args += ["--k", "auto", "--layers", "attn", "--max-steps", "1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    base, _ = load_model(tiny_dir)
    _, prompts = load_prompt_examples("demo-math:4")
    assert metrics["config"]["k"] == "auto"
    assert metrics["k_resolved"] == pytest.approx(resolve_auto_k(base, smol_tokenizer, "auto", prompts))
    bad = CliRunner().invoke(app, ["train", "--k", "auto@1.5", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--k: 'auto@1.5': the energy target must lie in (0, 1]" in bad.output

"""The embedded models, the loaders, and `rpsft train` end to end (these load the real SmolLM2-135M)."""

import json

import pytest
import torch
from rpsft.core.models import EMBEDDED_MODELS, load_model, tiny_model
from rpsft.core.selection import select_matrices
from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_embedded_smollm2_generates_and_reloads_from_cache(smol_model_dir):
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(select_matrices(model, "all")) == 30 * 7
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow
def test_gguf_file_path_loads_like_the_embedded_name(tmp_path):
    gguf = EMBEDDED_MODELS["smollm2-135m-instruct"].locate_gguf(tmp_path)
    from_file, _ = load_model(gguf, cache_dir=tmp_path)
    embedded, _ = load_model("smollm2-135m-instruct")
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(dict(from_file.named_parameters())[name], dict(embedded.named_parameters())[name])


@pytest.mark.slow
def test_embedded_gemma3_selection():
    model, tokenizer = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert len(select_matrices(model, "attn")) == 4 * model.config.num_hidden_layers
    assert tokenizer.chat_template  # a fallback template is set for this base model


def test_local_directory_and_bad_paths(tmp_path, smol_tokenizer):
    model = tiny_model("gemma3", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    assert type(loaded).__name__ == "Gemma3ForCausalLM" and tok.pad_token is not None
    with pytest.raises(FileNotFoundError, match="model: GGUF file"):
        load_model(tmp_path / "nothing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")


def test_cli_bad_input_fails_before_loading_a_model(tmp_path, monkeypatch):
    import rpsft.core.train

    loaded = []

    def load_model(*args, **kwargs):
        loaded.append(args)
        raise RuntimeError("a model was loaded before the input was validated")

    monkeypatch.setattr(rpsft.core.train, "load_model", load_model)
    cases = [
        (["--k", "-2"], "k: "),
        (["--layers", "bogus"], "unknown preset 'bogus'"),
        (["--data", str(tmp_path / "none.jsonl")], "none.jsonl"),
        (["--k", "abc"], "--k: 'abc' is not a number"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["train", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert loaded == []
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_cli_train_on_embedded_smollm2_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/train-demo.yaml",
        "--max-steps",
        "2",
        "--data",
        "demo-math:8",
        "--layers",
        "early-attn",
        "--k",
        "8",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["config"]["k"] == 8
    assert 0 < metrics["drift_mean"]
    tuned, _ = load_model(out / "model")
    base, _ = load_model("smollm2-135m-instruct")
    q0 = "model.layers.0.self_attn.q_proj.weight"
    q_late = "model.layers.29.self_attn.q_proj.weight"
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    assert not torch.equal(tuned_params[q0], base_params[q0])
    # the saved checkpoint is the trained model: the protected-block drift ||Uk^T (W - W0) Vk||_F recomputed
    # from it (k = 8, bases from an SVD of the base weights here) is the drift the run measured
    drift = metrics["drift"]
    assert set(drift) == set(select_matrices(base, "early-attn")) and q0 in drift and q_late not in drift
    for name, measured in drift.items():
        w0 = base_params[name].detach().double()
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        delta = tuned_params[name].detach().double() - w0
        recomputed = torch.linalg.norm(u[:, :8].T @ delta @ vh[:8].T).item()
        assert recomputed == pytest.approx(measured, rel=5e-2, abs=1e-7), name  # bases: float32, here float64

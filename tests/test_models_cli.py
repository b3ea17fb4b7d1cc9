"""The embedded models, the loaders, and `rpsft train` end to end (these load the real SmolLM2-135M)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rpsft_core.cli import app
from rpsft_core.models import EMBEDDED_MODELS, load_model, tiny_model
from rpsft_core.selection import select_matrices

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


def test_cli_bad_input_fails_before_loading_a_model(tmp_path):
    result = runner.invoke(app, ["train", "--k", "-2", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "k: " in result.output
    result = runner.invoke(app, ["train", "--layers", "bogus", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown preset 'bogus'" in result.output
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 2 and "none.jsonl" in result.output
    result = runner.invoke(app, ["train", "--k", "abc", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--k: 'abc' is not a number" in result.output
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
        "--output-dir",
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
    assert tuned_params[q_late].shape == base_params[q_late].shape

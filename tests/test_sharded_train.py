"""Sharded training from a TrainConfig (rpsft.core.sharded_train) on gloo ranks with a tiny Llama.

Two FSDP2 ranks equal one rank (and gradient accumulation equals a larger batch) for rpsft, l2-init, dft,
lora and rpsft-lora (only the adapters train); ``k: auto`` resolved on rank 0 reaches every rank; DDP
equals FSDP2; a run killed after its step-2 checkpoint resumes to the weights (adapters) of an uninterrupted
run, under FSDP2 and DDP; the consolidated checkpoint loads with load_model and, for LoRA, holds the merged
weights of merge_and_unload; osf and iw are a ConfigError.

The world-size comparisons run in float64 (the model is passed in), so reduction order is the only
difference: weights agree within 1e-9 of how far they moved. The resume runs load the model from its
directory in float32 and must match bit for bit.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from rpsft.core.config import TrainConfig
from rpsft.core.distributed import spawn_local
from rpsft.core.errors import ConfigError
from rpsft.core.fsdp import full_state
from rpsft.core.sharded_checkpoint import resumed_batch_mismatch
from rpsft.core.sharded_train import train_on_rank

pytestmark = pytest.mark.slow

STEPS, N_EXAMPLES, KILL_AT, WEIGHT_TOL = 3, 10, 2, 1e-9
LORA = {"lora_r": 3, "lora_alpha": 6.0}  # r = 3 over 2 ranks: uneven rows of lora_A
LORA_METHODS = ("lora", "rpsft-lora")
STEP_KEYS = {"step", "max_steps", "epoch", "loss", "learning_rate", "grad_norm"}
PENALTY_KEYS = {"rpsft/penalty", "rpsft/drift_mean", "rpsft/drift_max"}


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens, ChatML special tokens), built offline."""
    from rpsft.core.models import FALLBACK_CHAT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("sharded-train"))


def build_assets(root):
    """``(root, model_dir, data)``: a random-init Llama (hidden 32, 2 blocks, tied embeddings) saved with the
    byte tokenizer, and 10 sums as chat examples of different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gen = random.Random(0)
    data = root / "sums.jsonl"
    with data.open("w") as fh:
        for i in range(N_EXAMPLES):
            a, b = gen.randint(1, 99), gen.randint(1, 99)
            row = {"prompt": f"{a}+{b}", "response": f"{a + b}" + " ok" * (i % 3)}
            fh.write(json.dumps(row) + "\n")
    return root, model_dir, data


def make_config(assets, name, *, workers=1, strategy="fsdp2", **overrides):
    root, model_dir, data = assets
    values = {
        "model": str(model_dir),
        "data": str(data),
        "max_length": 48,
        "method": "rpsft",
        "k": 4,
        "lambda": 5.0,
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "lr_scheduler": "cosine",
        "batch_size": 4 // workers,
        "max_steps": STEPS,
        "output_dir": str(root / "runs" / name),
        "cache_dir": str(root / "cache"),
        "save_model": False,
        "resources": {"workers": workers, "strategy": strategy},
    }
    if values["method"] in LORA_METHODS:
        values.update(LORA)
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _train_jobs(rank, world_size, jobs, out_dir):
    """Each job on every rank: train (float64: the model passed in), then rank 0 saves the full weights,
    the on_step records, the metrics and the drift."""
    from transformers import AutoModelForCausalLM

    for name, config, float64, *options in jobs:
        kwargs = options[0] if options else {}
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float64) if float64 else None
        records = []
        result = train_on_rank(config, model=model, on_step=records.append, **kwargs)
        state = full_state(result.model)
        if rank > 0:  # what this rank saw: its metrics, and the records when every rank gets them
            seen = {
                "metrics": result.metrics,
                "records": records if kwargs.get("on_step_every_rank") else None,
            }
            torch.save(seen, f"{out_dir}/{name}-rank{rank}.pt")
        if rank == 0:
            torch.save(
                {
                    "state": state,
                    "records": records,
                    "metrics": result.metrics,
                    "drift": result.drift,
                    "model_dir": result.model_dir and str(result.model_dir),
                },
                f"{out_dir}/{name}.pt",
            )


def _killed_run(rank, world_size, config):
    """The run dies right after step KILL_AT (its checkpoint is complete by then)."""

    def on_step(record):
        if record["step"] == KILL_AT:
            raise RuntimeError("simulated kill")

    train_on_rank(config, on_step=on_step)


def resume_config(assets, name, method="rpsft", strategy="fsdp2", workers=2):
    return make_config(
        assets,
        name,
        workers=workers,
        strategy=strategy,
        max_steps=4,
        warmup_ratio=0.25,
        checkpoint_every=2,
        activation_checkpointing=strategy == "fsdp2",
        method=method,
    )


# (method, strategy) of the kill-and-resume runs, and the name of each one's uninterrupted run in ``runs``
RESUMED = {
    ("rpsft", "fsdp2"): "straight",
    ("rpsft-lora", "fsdp2"): "straight-rpsft-lora",
    ("rpsft", "ddp"): "straight-ddp",
}
AUTO_K = {"k": "auto@0.5", "auto_k_prompts": "demo-math:4"}  # the energy rule on 4 generated prompts


def run_jobs(world_size, jobs, out_dir):
    spawn_local(_train_jobs, world_size, jobs, str(out_dir))
    return {job[0]: torch.load(out_dir / f"{job[0]}.pt", weights_only=False) for job in jobs}


@pytest.fixture(scope="module")
def runs(assets):
    """Every run of the comparisons: one-rank references, then two-rank FSDP2 / DDP runs in one spawn."""
    from rpsft.core.bases import compute_bases, save_bases
    from rpsft.core.selection import select_matrices
    from transformers import AutoModelForCausalLM

    root = assets[0]
    out = root / "results"
    out.mkdir()
    bases_file = root / "bases-k8.safetensors"  # a shared file at a larger k, as a sweep passes one
    model = AutoModelForCausalLM.from_pretrained(assets[1], dtype=torch.float64)
    save_bases(compute_bases(select_matrices(model, "all"), 8), bases_file, 8)
    methods = ("rpsft", "l2-init", "dft", *LORA_METHODS)
    one = [
        (f"ref-{m}", make_config(assets, f"ref-{m}", method=m, save_model=m in LORA_METHODS), True)
        for m in methods
    ] + [("ref-rpsft-auto", make_config(assets, "ref-rpsft-auto", **AUTO_K), True)]
    two = [
        (
            "fsdp-rpsft-lora",
            make_config(
                assets,
                "fsdp-rpsft-lora",
                workers=2,
                method="rpsft-lora",
                activation_checkpointing=True,
                save_model=True,
            ),
            True,
        ),
        ("fsdp-lora", make_config(assets, "fsdp-lora", workers=2, method="lora"), True),
        (
            "ddp-rpsft-lora",
            make_config(assets, "ddp-rpsft-lora", workers=2, strategy="ddp", method="rpsft-lora"),
            True,
        ),
        ("straight-rpsft-lora", resume_config(assets, "straight-rpsft-lora", "rpsft-lora"), False),
        ("straight-ddp", resume_config(assets, "straight-ddp", strategy="ddp"), False),
        (
            "fsdp-rpsft-lora-accum",
            make_config(
                assets, "fsdp-rpsft-lora-accum", workers=2, method="rpsft-lora", batch_size=1, grad_accum=2
            ),
            True,
        ),
        ("fsdp-rpsft-auto", make_config(assets, "fsdp-rpsft-auto", workers=2, **AUTO_K), True),
        (
            "fsdp-rpsft",
            make_config(assets, "fsdp-rpsft", workers=2, activation_checkpointing=True, save_model=True),
            True,
        ),
        ("fsdp-l2-init", make_config(assets, "fsdp-l2-init", workers=2, method="l2-init"), True),
        ("fsdp-dft", make_config(assets, "fsdp-dft", workers=2, method="dft"), True),
        (
            "fsdp-rpsft-accum",
            make_config(assets, "fsdp-rpsft-accum", workers=2, batch_size=1, grad_accum=2),
            True,
        ),
        (
            "fsdp-l2-init-accum",
            make_config(
                assets, "fsdp-l2-init-accum", workers=2, method="l2-init", batch_size=1, grad_accum=2
            ),
            True,
        ),
        (
            "ddp-rpsft",
            make_config(assets, "ddp-rpsft", workers=2, strategy="ddp"),
            True,
            {"bases_dir": str(root / "shared-bases")},  # rank 0 computes the bases into a sweep's directory
        ),
        (
            "fsdp-rpsft-file",
            make_config(assets, "fsdp-rpsft-file", workers=2),
            True,
            {"bases_file": str(bases_file), "on_step_every_rank": True},
        ),
        (
            "ddp-rpsft-file",
            make_config(assets, "ddp-rpsft-file", workers=2, strategy="ddp"),
            True,
            {"bases_file": str(bases_file)},
        ),
        (
            "ddp-l2-init",
            make_config(assets, "ddp-l2-init", workers=2, strategy="ddp", method="l2-init"),
            True,
        ),
        ("straight", resume_config(assets, "straight"), False),
    ]
    results = run_jobs(1, one, out)
    results.update(run_jobs(2, two, out))
    results["rank1-records"] = torch.load(out / "fsdp-rpsft-file-rank1.pt")["records"]
    results["rank1-auto-metrics"] = torch.load(out / "fsdp-rpsft-auto-rank1.pt")["metrics"]
    return results


def lora_model(assets, method="rpsft-lora"):
    """The float64 PEFT LoRA model a LoRA run starts from: the shared set-up (rpsft.core.methods.add_adapters)
    right after ``set_seed(config.seed)``, as every rank builds it."""
    from rpsft.core.methods import add_adapters
    from rpsft.core.selection import select_matrices
    from transformers import AutoModelForCausalLM, set_seed

    config = make_config(assets, "initial", method=method)
    model = AutoModelForCausalLM.from_pretrained(assets[1], dtype=torch.float64)
    selection = select_matrices(model, config.layers)
    set_seed(config.seed)
    return add_adapters(model, config, selection)


@pytest.fixture(scope="module")
def initial(assets):
    """The initial weights by plain name: ``initial[method]`` (the PEFT model's names for the LoRA methods,
    whose adapters start alike)."""
    from rpsft.core.fsdp import parameter_names
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets[1], dtype=torch.float64)
    base = {name: p.detach().clone() for name, p in parameter_names(model).items()}
    lora = {name: p.detach().clone() for name, p in parameter_names(lora_model(assets)).items()}
    return {m: lora if m in LORA_METHODS else base for m in ("rpsft", "l2-init", "dft", *LORA_METHODS)}


def assert_same_weights(got, want, initial, tol=WEIGHT_TOL):
    """Every trained parameter of ``got`` within ``tol`` of how far it moved in ``want``; for a LoRA model
    the trained ones are the adapters, and the frozen base weights are exactly the initial ones."""
    assert set(got) == set(want) == set(initial)
    adapters = any(".lora_" in name for name in want)
    for name, weight in want.items():
        if adapters and ".lora_" not in name:
            assert torch.equal(got[name], initial[name]) and torch.equal(weight, initial[name]), name
            continue
        moved = (weight - initial[name].to(weight.dtype)).norm()
        assert moved > 0, name  # every parameter trained
        assert (got[name] - weight).norm() <= tol * moved, name


def assert_same_steps(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert set(a) == set(b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-12)
        for key in PENALTY_KEYS & set(b):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12 if "drift" in key else 1e-20)


@pytest.mark.parametrize("method", ["rpsft", "l2-init", "dft", *LORA_METHODS])
def test_two_fsdp2_ranks_and_gradient_accumulation_train_like_one_rank(runs, initial, method):
    """2 ranks x batch 2 and 2 ranks x batch 1 x 2 micro-batches give the update of 1 rank x batch 4."""
    ref = runs[f"ref-{method}"]
    names = [f"fsdp-{method}"] + (
        [f"fsdp-{method}-accum"] if method in ("rpsft", "l2-init", "rpsft-lora") else []
    )
    for name in names:
        got = runs[name]
        assert_same_weights(got["state"], ref["state"], initial[method])
        assert_same_steps(got["records"], ref["records"])
        assert got["drift"] == pytest.approx(ref["drift"], rel=1e-9)
        assert got["metrics"]["train_loss"] == pytest.approx(ref["metrics"]["train_loss"], rel=1e-10)
    records = ref["records"]
    assert [r["max_steps"] for r in records] == [STEPS] * STEPS
    if method in ("dft", "lora"):
        assert all(set(r) == STEP_KEYS for r in records) and ref["drift"] == {}
        assert ref["metrics"]["bases_bytes"] == 0
    else:
        assert all(set(r) == STEP_KEYS | PENALTY_KEYS for r in records)
        assert (
            records[0]["rpsft/penalty"] == 0.0 < records[-1]["rpsft/penalty"]
        )  # zero at the pretrained weights
        assert len(ref["drift"]) == ref["metrics"]["n_matrices"] == 14
        assert ref["metrics"]["bases_bytes"] > runs[f"fsdp-{method}"]["metrics"]["bases_bytes"] > 0
    if method in LORA_METHODS:  # the adapters of all 14 selected matrices trained, nothing else
        assert sum(".lora_" in name for name in ref["state"]) == 2 * 14


@pytest.mark.parametrize("method", ["rpsft", "l2-init", "rpsft-lora"])
def test_ddp_trains_like_fsdp2(assets, runs, initial, method):
    ddp, fsdp = runs[f"ddp-{method}"], runs[f"fsdp-{method}"]
    assert_same_weights(ddp["state"], fsdp["state"], initial[method])
    assert_same_steps(ddp["records"], fsdp["records"])
    assert ddp["drift"] == pytest.approx(fsdp["drift"], rel=1e-9)
    assert (ddp["metrics"]["strategy"], fsdp["metrics"]["strategy"]) == ("ddp", "fsdp2")
    if method == "rpsft":
        assert len(list((assets[0] / "shared-bases").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_a_shared_bases_file_at_a_larger_k_gives_the_run_that_computes_its_own(runs, initial, strategy):
    """Sliced to k = 4 from a file at k = 8 (each FSDP2 rank reads its rows of Uk; DDP reads the whole file)."""
    prefix = "fsdp" if strategy == "fsdp2" else "ddp"
    got, want = runs[f"{prefix}-rpsft-file"], runs["fsdp-rpsft"]
    assert_same_weights(got["state"], want["state"], initial["rpsft"])
    assert_same_steps(got["records"], want["records"])
    assert got["drift"] == pytest.approx(want["drift"], rel=1e-9)
    if strategy == "fsdp2":  # on_step_every_rank: rank 1 saw rank 0's records
        assert runs["rank1-records"] == got["records"]


def test_k_auto_resolved_on_rank_0_reaches_rank_1_and_both_train_like_one_rank(runs, initial):
    """Rank 0 runs the energy rule and broadcasts its k: both ranks report it, and the run equals one rank's
    that resolved the same k itself (a rank at another k protects other blocks, and the run breaks)."""
    got, ref = runs["fsdp-rpsft-auto"], runs["ref-rpsft-auto"]
    k = ref["metrics"]["k_resolved"]
    assert isinstance(k, float) and 0.0 < k < 1.0  # a fraction of each matrix's rank, not a default
    assert got["metrics"]["k_resolved"] == runs["rank1-auto-metrics"]["k_resolved"] == k
    assert_same_weights(got["state"], ref["state"], initial["rpsft"])
    assert_same_steps(got["records"], ref["records"])
    assert got["drift"] == pytest.approx(ref["drift"], rel=1e-9)
    assert got["drift"] != pytest.approx(runs["fsdp-rpsft"]["drift"], rel=1e-3)  # k = 4 protects other blocks


@pytest.mark.parametrize(("method", "strategy"), list(RESUMED))
def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_uninterrupted_weights(
    assets, runs, initial, method, strategy
):
    root = assets[0]
    name = "resumed" if method == "rpsft" else f"resumed-{method}"
    name += "" if strategy == "fsdp2" else f"-{strategy}"
    config = resume_config(assets, name, method, strategy)
    with pytest.raises(Exception, match="simulated kill"):
        spawn_local(_killed_run, 2, config)
    dcp_dir = root / "runs" / name / "dcp"
    assert [p.name for p in dcp_dir.iterdir()] == ["step-2"]
    assert (dcp_dir / "step-2" / "complete.json").is_file()

    out = root / f"{name}-results"
    out.mkdir()
    resumed = run_jobs(2, [(name, config, False)], out)[name]
    straight = runs[RESUMED[(method, strategy)]]
    assert (resumed["metrics"]["strategy"], straight["metrics"]["strategy"]) == (strategy, strategy)
    assert resumed["metrics"]["resumed_from_step"] == 2 and straight["metrics"]["resumed_from_step"] == 0
    assert resumed["metrics"]["global_steps"] == straight["metrics"]["global_steps"] == 4
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    assert resumed["records"] == straight["records"][2:]
    assert set(resumed["state"]) == set(straight["state"]) == set(initial[method])
    for key, weight in straight["state"].items():
        assert torch.equal(resumed["state"][key], weight), key
        if method == "rpsft":
            assert not torch.equal(weight, initial[method][key].float()), key
        elif ".lora_B." in key:  # zero at the start
            assert weight.abs().max() > 0, key
        elif ".lora_" not in key:  # frozen
            assert torch.equal(weight, initial[method][key].float()), key
    assert resumed["metrics"]["log_history"] == straight["metrics"]["log_history"]
    assert resumed["metrics"]["train_loss"] == straight["metrics"]["train_loss"]
    assert straight["records"][0]["learning_rate"] == 0.0  # one warmup step of four
    assert [p.name for p in dcp_dir.iterdir()] == ["step-4"]  # only the latest checkpoint is kept


def test_a_run_killed_on_two_ranks_resumes_on_one_rank_at_the_same_global_batch(assets, runs, initial):
    """The checkpoint of 2 ranks x batch 2 (FSDP2 shards) resumes on 1 rank x batch 4: DCP reshards the model
    and optimizer, and the data position is in examples, so the run ends at the uninterrupted run's weights up
    to float32 reduction order."""
    name = "resumed-other-world"
    with pytest.raises(Exception, match="simulated kill"):
        spawn_local(_killed_run, 2, resume_config(assets, name))
    checkpoint = assets[0] / "runs" / name / "dcp" / "step-2"
    assert resumed_batch_mismatch(checkpoint, 4) is None  # 1 x 4 = 2 x 2: no warning
    message = resumed_batch_mismatch(checkpoint, 2)  # 1 x 2 would cut the same examples into other steps
    assert "took 4 examples per optimizer step, this run takes 2" in message and "Fix:" in message
    out = assets[0] / f"{name}-results"
    out.mkdir()
    resumed = run_jobs(1, [(name, resume_config(assets, name, workers=1), False)], out)[name]
    straight = runs["straight"]
    assert resumed["metrics"]["resumed_from_step"] == 2 and resumed["metrics"]["workers"] == 1
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    for got, want in zip(resumed["records"], straight["records"][2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["learning_rate"] == want["learning_rate"]
    assert_same_weights(resumed["state"], straight["state"], initial["rpsft"], tol=1e-4)


def test_the_consolidated_checkpoint_loads_with_load_model_and_holds_the_trained_weights(runs):
    from rpsft.core.models import load_model
    from safetensors import safe_open

    run = runs["fsdp-rpsft"]  # two FSDP2 ranks with activation checkpointing
    model_dir = run["model_dir"]
    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and not any("_checkpoint_wrapped_module" in k for k in keys)
    model, tokenizer = load_model(model_dir, dtype=torch.float64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(run["state"])
    for name, weight in run["state"].items():
        assert torch.equal(loaded[name].detach(), weight), name
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False)

    metrics = json.loads((Path(model_dir).parent / "metrics.json").read_text())
    for key in (
        "train_loss",
        "global_steps",
        "train_seconds",
        "resumed_from_step",
        "n_examples",
        "n_matrices",
        "log_history",
        "drift",
        "drift_mean",
        "workers",
        "strategy",
    ):
        assert key in metrics, key
    assert (metrics["workers"], metrics["strategy"], metrics["n_examples"]) == (2, "fsdp2", N_EXAMPLES)
    assert metrics["drift"] == pytest.approx(run["drift"])


def test_the_consolidated_lora_checkpoint_holds_the_weights_merge_and_unload_gives(assets, runs, initial):
    """Both consolidated rpsft-lora checkpoints (1 rank; 2 FSDP2 ranks with activation checkpointing) are
    plain HF checkpoints of the merged weights: the 1-rank one is exactly merge_and_unload of its adapters,
    the 2-rank one within the world-size tolerance of it."""
    from rpsft.core.fsdp import parameter_names
    from rpsft.core.models import load_model
    from safetensors import safe_open

    ref, got = runs["ref-rpsft-lora"], runs["fsdp-rpsft-lora"]
    peft_model = lora_model(assets)
    with torch.no_grad():
        for name, param in parameter_names(peft_model).items():
            param.copy_(ref["state"][name])
    merged = {name: p.detach() for name, p in peft_model.merge_and_unload().named_parameters()}
    base = initial["rpsft"]
    targeted = set(ref["drift"])  # the 14 selected matrices
    assert len(targeted) == 14 and targeted < set(merged) == set(base)
    for run in (ref, got):
        with safe_open(f"{run['model_dir']}/model.safetensors", framework="pt") as handle:
            keys = set(handle.keys())
        assert keys == set(base)  # no adapter or base_layer entries, no tied lm_head
    ref_model, _ = load_model(ref["model_dir"], dtype=torch.float64)
    got_model, tokenizer = load_model(got["model_dir"], dtype=torch.float64)
    assert got_model.lm_head.weight.data_ptr() == got_model.model.embed_tokens.weight.data_ptr()
    ref_loaded, got_loaded = dict(ref_model.named_parameters()), dict(got_model.named_parameters())
    for name, weight in merged.items():
        assert torch.equal(ref_loaded[name], weight), name
        moved = (weight - base[name]).norm()
        if name in targeted:
            assert moved > 0, name
            assert (got_loaded[name] - weight).norm() <= WEIGHT_TOL * moved, name
        else:
            assert torch.equal(got_loaded[name], base[name]) and moved == 0, name
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False)


@pytest.mark.parametrize(
    "method, workers, what", [("osf", 2, "OSF adapters"), ("iw", 1, "reference")], ids=str
)
def test_methods_sharded_training_cannot_run_name_resources_workers_and_the_fix(method, workers, what):
    """Raised before any model, data or process group is touched."""
    config = TrainConfig(method=method, resources={"workers": workers})
    with pytest.raises(
        ConfigError, match=rf"resources\.workers: {workers}.*{what}.*rpsft-lora.*Fix: resources\.workers: 1"
    ):
        train_on_rank(config)


def test_the_lora_methods_pass_the_sharded_checks():
    from rpsft.core.sharded_method import check_sharded_method

    for method in LORA_METHODS:
        spec = check_sharded_method(TrainConfig(method=method, resources={"workers": 2}))
        assert (spec.adapter, spec.uses_bases) == ("lora", method == "rpsft-lora")


def test_rpsft_train_workers_2_runs_two_local_ranks_and_writes_the_checkpoint(assets, tmp_path):
    """``rpsft train --workers 2``: one process group of two local ranks (gloo), the memory preflight first;
    the metrics say 2 workers and the consolidated checkpoint loads."""
    import subprocess
    import sys

    from rpsft.core.models import load_model

    root, model_dir, data = assets
    out = tmp_path / "cli-run"
    cmd = [
        str(Path(sys.executable).parent / "rpsft"),
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--method",
        "l2-init",
        "--lambda",
        "2.0",
        "--max-steps",
        "2",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["strategy"] == "fsdp2" and metrics["global_steps"] == 2
    assert metrics["drift_mean"] > 0
    model, _ = load_model(str(out / "model"))
    assert sum(p.numel() for p in model.parameters()) > 0

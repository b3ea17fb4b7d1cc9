"""The memory preflight: exact model sizes, the protected bases' sizes, the estimate's rules, its refusals and
fixes, the estimate against the peak that torch's ``MemTracker`` measures for a real training step of a tiny
Llama, and the sweep-level check (the paper's 8B GPU config, and a real local Ray on CPU)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PAPER_DATA
from rpsft.core.config import TrainConfig
from rpsft.core.errors import ConfigError, ModelSourceError
from rpsft.core.memory.dims import ModelDims, bases_bytes, model_dims, model_dims_for, protected_shapes
from rpsft.core.memory.estimate import estimate_worker_memory
from rpsft.core.memory.measure import measure_peak_bytes
from rpsft.core.memory.preflight import (
    MemoryPreflightError,
    MemoryPreflightWarning,
    check_fits,
    estimate_train_memory,
    preflight_train_memory,
)
from rpsft.core.memory.report import MemoryEstimate
from rpsft.sweeps.config.errors import SweepConfigError
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3TextConfig, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
PAPER_8B_GPU = REPO / "sweeps" / "configs" / "paper-8b-gpu.yaml"
GIB = 1 << 30
DEVICE_80G = 80 * GIB
LLAMA_31_8B_PARAMS = 8_030_261_248  # the published parameter count of Llama-3.1-8B


def llama_8b_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )


def tiny_config(*, tied: bool = False, **overrides: int) -> LlamaConfig:
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    sizes.update(overrides)
    return LlamaConfig(**sizes, tie_word_embeddings=tied)


def llama_closed_form_params(config: LlamaConfig) -> int:
    """Llama's parameter count by hand: embeddings, per layer q/k/v/o + gate/up/down + 2 norms, final norm, head."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h + config.num_hidden_layers * layer + h + (0 if config.tie_word_embeddings else v * h)


@pytest.fixture(scope="module")
def dims_8b() -> ModelDims:
    return model_dims(llama_8b_config())


def estimate(dims: ModelDims, **overrides: object) -> MemoryEstimate:
    inputs: dict[str, object] = dict(
        workers=1,
        strategy="single",
        param_dtype="float32",
        mixed_precision=None,
        batch_size=1,
        max_length=2048,
        activation_checkpointing=True,
    )
    inputs.update(overrides)
    return estimate_worker_memory(dims, **inputs)  # type: ignore[arg-type]


# --- model sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_param_count_matches_an_instantiated_model(tied: bool) -> None:
    config = tiny_config(tied=tied)
    model = AutoModelForCausalLM.from_config(config)
    dims = model_dims(config)

    assert dims.n_params == sum(p.numel() for p in model.parameters())
    assert dims.n_params == llama_closed_form_params(config)
    assert dims.n_block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert dims.n_root_params == dims.n_params - config.num_hidden_layers * dims.n_block_params
    assert dims.tied_embeddings is tied
    assert (dims.n_layers, dims.hidden, dims.intermediate, dims.vocab) == (2, 64, 128, 256)
    assert (dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.kv_dim) == (4, 2, 16, 32)
    assert dims.n_block_norms == 2


def test_llama_8b_count_is_the_published_one(dims_8b: ModelDims) -> None:
    assert dims_8b.n_params == LLAMA_31_8B_PARAMS == llama_closed_form_params(llama_8b_config())
    assert dims_8b.n_root_params == 2 * 128256 * 4096 + 4096
    assert not dims_8b.tied_embeddings


def test_gemma3_nested_text_config_counts_the_text_decoder() -> None:
    text = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
    )
    nested = model_dims(Gemma3Config(text_config=text))
    flat_config = Gemma3TextConfig(**text)
    model = AutoModelForCausalLM.from_config(flat_config)

    assert nested == model_dims(flat_config)
    assert nested.n_params == sum(p.numel() for p in model.parameters())
    assert nested.q_dim == 128 != nested.hidden
    assert nested.n_block_norms == 4


def test_model_dims_for_a_local_directory(tmp_path: Path) -> None:
    config = tiny_config(tied=True)
    config.save_pretrained(tmp_path)
    assert model_dims_for(tmp_path) == model_dims(config)


def test_model_dims_for_an_unknown_hub_id_offline_names_the_model() -> None:
    with pytest.raises(ModelSourceError, match="no-such-org/no-such-model"):
        model_dims_for("no-such-org/no-such-model", local_files_only=True)


@pytest.mark.slow
def test_model_dims_for_the_embedded_smollm2() -> None:
    dims = model_dims_for("smollm2-135m-instruct")
    closed_form = llama_closed_form_params(
        LlamaConfig(
            hidden_size=dims.hidden,
            intermediate_size=dims.intermediate,
            num_hidden_layers=dims.n_layers,
            num_attention_heads=dims.n_heads,
            num_key_value_heads=dims.n_kv_heads,
            vocab_size=dims.vocab,
            tie_word_embeddings=True,
        )
    )
    assert dims.tied_embeddings
    assert dims.n_params == closed_form
    assert 130e6 < dims.n_params < 140e6


# --- protected matrices and their bases ----------------------------------------------------------------------

SELECTIONS = [
    "all",
    "attn",
    "late-attn",
    "all+embed",
    {"types": ["lm_head"]},
    {"types": ["q", "down"], "layers": "1:", "regex": r"layers\.1\."},
]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layers", SELECTIONS, ids=lambda s: s if isinstance(s, str) else "spec")
def test_protected_shapes_are_what_select_matrices_picks(tied: bool, layers: object) -> None:
    from rpsft.core.selection import select_matrices

    config = tiny_config(tied=tied, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(config)
    selected = {name: tuple(param.shape) for name, param in select_matrices(model, layers).items()}
    assert protected_shapes(model_dims(config), layers) == selected


@pytest.mark.parametrize("k", [0, 4, 0.25, 1.0], ids=["k0", "k4", "fraction", "full"])
def test_bases_bytes_are_what_the_bases_hold(k: int | float) -> None:
    from rpsft.core.bases import compute_bases
    from rpsft.core.row_shards import shard_bases
    from rpsft.core.selection import select_matrices

    config = tiny_config()
    model = AutoModelForCausalLM.from_config(config)
    selection = select_matrices(model, "all")
    bases = compute_bases(selection, k)
    total, replicated = bases_bytes(protected_shapes(model_dims(config), "all"), k)

    assert total == bases.nbytes()
    # two FSDP2 ranks (every row count is even here): each holds half the rows and the replicated part whole
    for rank in (0, 1):
        held = sum(shard.nbytes() for shard in shard_bases(bases, 2, rank).values())
        assert held == (total - replicated) // 2 + replicated


# --- the rules -----------------------------------------------------------------------------------------------


def test_fsdp2_shards_weights_grads_states_and_bases_while_ddp_does_not(dims_8b: ModelDims) -> None:
    common = dict(param_dtype="float32", mixed_precision="bf16", bases_bytes_total=3 * GIB)
    fsdp2 = {n: estimate(dims_8b, strategy="fsdp2", workers=n, **common) for n in (2, 4)}
    ddp = {n: estimate(dims_8b, strategy="ddp", workers=n, **common) for n in (2, 4)}

    for field in ("weights", "grads", "optimizer_states", "bases"):
        assert getattr(fsdp2[2], field) == pytest.approx(2 * getattr(fsdp2[4], field), rel=1e-9), field
        assert getattr(ddp[2], field) == getattr(ddp[4], field), field
    assert ddp[2].weights == 4 * LLAMA_31_8B_PARAMS
    assert ddp[2].optimizer_states == 2 * ddp[2].weights
    assert ddp[2].bases == 3 * GIB
    assert ddp[2].grad_buckets == ddp[2].grads
    assert fsdp2[2].activations == fsdp2[4].activations
    assert ddp[2].activations == ddp[4].activations
    assert fsdp2[2].total > fsdp2[4].total
    assert ddp[2].total == ddp[4].total
    # the whole model is on each rank's device before it is sharded
    assert fsdp2[4].load_peak == 4 * LLAMA_31_8B_PARAMS and ddp[2].load_peak == 0


def test_fsdp2_replicates_vk_and_sref(dims_8b: ModelDims) -> None:
    total, replicated = 8 * GIB, 2 * GIB
    by_workers = {
        n: estimate(
            dims_8b, strategy="fsdp2", workers=n, bases_bytes_total=total, bases_replicated_bytes=replicated
        )
        for n in (1, 2, 8)
    }
    assert by_workers[1].bases == total
    assert by_workers[2].bases == 3 * GIB + 2 * GIB
    assert by_workers[8].bases == (6 * GIB) // 8 + 2 * GIB
    assert estimate(dims_8b, bases_bytes_total=total, bases_replicated_bytes=replicated).bases == total


def test_activation_checkpointing_and_bf16_shrink_activations(dims_8b: ModelDims) -> None:
    full = estimate(dims_8b, activation_checkpointing=False)
    checkpointed = estimate(dims_8b, activation_checkpointing=True)
    bf16 = estimate(dims_8b, activation_checkpointing=False, param_dtype="bfloat16")
    assert checkpointed.activations + checkpointed.recomputed_block < full.activations / 10
    assert bf16.activations < full.activations
    assert bf16.weights * 2 == full.weights


def test_autocast_keeps_16_bit_weight_copies(dims_8b: ModelDims) -> None:
    plain = estimate(dims_8b, activation_checkpointing=False)
    autocast = estimate(dims_8b, activation_checkpointing=False, mixed_precision="bf16")
    checkpointed = estimate(dims_8b, activation_checkpointing=True, mixed_precision="bf16")
    copies = 2 * (32 * dims_8b.n_block_params + dims_8b.vocab * dims_8b.hidden)
    assert plain.buffers == 0 and autocast.buffers == copies
    # with checkpointing the head's and one block's copies are saved; the cast cache holds the rest until the
    # forward returns
    assert checkpointed.buffers + checkpointed.cast_cache == copies
    assert checkpointed.buffers == 2 * (dims_8b.n_block_params + dims_8b.vocab * dims_8b.hidden)


def test_invalid_inputs_are_config_errors(dims_8b: ModelDims) -> None:
    with pytest.raises(ConfigError, match="resources.workers"):
        estimate(dims_8b, strategy="single", workers=2)
    with pytest.raises(ConfigError, match="resources.strategy"):
        estimate(dims_8b, strategy="zero3")
    with pytest.raises(ConfigError, match="train.dtype"):
        estimate(dims_8b, param_dtype="float64")
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        estimate(dims_8b, mixed_precision="fp8")


# --- a TrainConfig ---------------------------------------------------------------------------------------------


def train_config(tmp_path: Path, **fields: object) -> TrainConfig:
    return TrainConfig.model_validate({"output_dir": str(tmp_path), **fields})


def test_estimate_train_memory_reads_the_config(tmp_path: Path, dims_8b: ModelDims) -> None:
    fields = dict(
        method="rpsft",
        k=768,
        layers="attn",
        dtype="float32",
        mixed_precision="bf16",
        batch_size=2,
        grad_accum=4,
        max_length=4096,
        activation_checkpointing=True,
    )
    sharded = estimate_train_memory(
        train_config(tmp_path, **fields, resources={"workers": 8, "gpus_per_worker": 1}), dims_8b
    )
    total, replicated = bases_bytes(protected_shapes(dims_8b, "attn"), 768)
    assert sharded == estimate(
        dims_8b,
        strategy="fsdp2",
        workers=8,
        mixed_precision="bf16",
        batch_size=2,
        grad_accum=4,
        max_length=4096,
        bases_bytes_total=total,
        bases_replicated_bytes=replicated,
    )
    one = estimate_train_memory(train_config(tmp_path, **fields, resources={"gpus": 1}), dims_8b)
    assert (one.strategy, one.workers) == ("single", 1)

    full_rank = estimate_train_memory(train_config(tmp_path, method="l2-init", dtype="bfloat16"), dims_8b)
    assert full_rank.bases == 2 * sum(m * n for m, n in protected_shapes(dims_8b, "all").values())
    lora = estimate_train_memory(train_config(tmp_path, method="lora", lora_r=32), dims_8b)
    assert lora.trainable_params == sum(32 * (m + n) for m, n in protected_shapes(dims_8b, "all").values())
    assert lora.optimizer_states == 2 * 4 * lora.trainable_params < estimate(dims_8b).optimizer_states / 50
    iw = estimate_train_memory(train_config(tmp_path, method="iw"), dims_8b)
    assert iw.reference_model == iw.weights
    auto = estimate_train_memory(
        train_config(tmp_path, method="rpsft", k="auto", auto_k_prompts="demo-math:4"), dims_8b
    )
    assert auto.bases == bases_bytes(protected_shapes(dims_8b, "all"), 0.25)[0]


def test_preflight_train_memory_refuses_or_returns_the_estimate(tmp_path: Path) -> None:
    config = tiny_config()
    config.save_pretrained(tmp_path / "model")
    fits = train_config(tmp_path, model=str(tmp_path / "model"), batch_size=2, max_length=64)
    estimate_ = preflight_train_memory(fits)
    assert estimate_ is not None and estimate_.total < 64 << 20

    with pytest.raises(MemoryPreflightError, match=r"train\.batch_size: \d+"):
        preflight_train_memory(fits.model_copy(update={"batch_size": 4096}), device_bytes=256 << 20)
    with pytest.warns(MemoryPreflightWarning, match="no-such-org/no-such-model"):
        assert preflight_train_memory(fits.model_copy(update={"model": "no-such-org/no-such-model"})) is None


# --- refusals and fixes --------------------------------------------------------------------------------------


def test_planted_8b_fp32_on_one_80g_worker_is_refused(dims_8b: ModelDims) -> None:
    # By hand: 8,030,261,248 params x 4 B = 29.92 GiB of weights, as much of gradients, 59.83 GiB of AdamW
    # moments and 29.92 GiB of foreach temporaries: the optimizer step alone needs 149.6 GiB > 72 GiB usable.
    planted = estimate(dims_8b, strategy="single", workers=1, param_dtype="float32")
    assert planted.weights == 4 * LLAMA_31_8B_PARAMS
    assert planted.total == planted.optimizer_step_peak == 5 * planted.weights

    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(planted, DEVICE_80G)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "80.00 GiB" in message and "72.00 GiB" in message
    assert f"{planted.total / GIB:.2f} GiB" in message
    assert re.search(rf"weights +{planted.weights / GIB:.2f}\n", message)
    assert re.search(rf"optimizer_states +{planted.optimizer_states / GIB:.2f}\n", message)
    assert re.search(rf"optimizer step +{planted.optimizer_step_peak / GIB:.2f}\n", message)
    assert "resources.strategy: fsdp2, resources.gpus_per_worker: 1" in message
    workers = int(re.search(r"resources\.workers: (\d+)", message).group(1))

    assert 2 <= workers <= 64
    check_fits(estimate(dims_8b, strategy="fsdp2", workers=workers, param_dtype="float32"), DEVICE_80G)
    with pytest.raises(MemoryPreflightError):
        check_fits(
            estimate(dims_8b, strategy="fsdp2", workers=workers - 1, param_dtype="float32"), DEVICE_80G
        )


def test_feasible_8b_fsdp2_run_is_accepted(dims_8b: ModelDims) -> None:
    # By hand, per worker (8 workers, fp32 params, bf16 mixed precision, checkpointing, 1 x 2048 tokens):
    #   weights = grads = 8,030,261,248 x 4 / 8 = 4,015,130,624 B (3.74 GiB); AdamW moments 8,030,261,248 B
    #   block inputs 32 x 2048 x 4096 x 2 = 536,870,912 + final norm (4 + 4) x 4096 x 2048 = 67,108,864
    #   recomputed block 2048 x [2 x (4 + 4) x 4096 + 2 x (4 x 4096 (k, v repeated to q) + 4 x 14336)]
    #                  = 436,207,616
    #   logits 12 x 2048 x 128256 = 3,152,019,456
    #   FSDP2 buffers: block (3 x 2 + 4) x 218,112,000 + root 2 x 2 x 1,050,677,248 = 6,383,828,992
    #   forward/backward: 4.015e9 + 8.030e9 + 6.384e9 + 0.604e9 + max(3.152e9, 0.436e9 + 4.015e9) = 23.48e9 B
    #   end of backward: 4.015e9 x 2 + 8.030e9 + 4.203e9 (root gathered) + 4.203e9 (root reduce) = 24.47e9 B
    #   optimizer step: 4.015e9 x 3 + 8.030e9 = 20.08e9 B; model load 8.030e9 x 4 = 32.12e9 B = 29.92 GiB
    feasible = estimate(
        dims_8b, strategy="fsdp2", workers=8, param_dtype="float32", mixed_precision="bf16", max_length=2048
    )
    assert feasible.weights == 4_015_130_624
    assert feasible.optimizer_states == 8_030_261_248
    assert feasible.logits == 3_152_019_456
    assert feasible.activations == 536_870_912 + 67_108_864
    assert feasible.recomputed_block == 436_207_616
    assert feasible.buffers == 6_383_828_992
    assert feasible.root_reduce == 4_202_708_992
    assert feasible.forward_backward_peak == 23_484_538_880
    assert feasible.backward_end_peak == 24_465_940_480
    assert feasible.optimizer_step_peak == 20_075_653_120
    assert feasible.total == feasible.load_peak == 32_121_044_992
    check_fits(feasible, DEVICE_80G)


def test_fixes_lower_the_estimate_and_name_only_what_applies(dims_8b: ModelDims) -> None:
    # optimizer-bound (one float32 process): bf16 autocast and checkpointing do not lower the step's peak
    plain = estimate(dims_8b, strategy="single", param_dtype="float32", activation_checkpointing=False)
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(plain, DEVICE_80G)
    assert all(fix.estimate.total < plain.total for fix in caught.value.fixes)
    message = str(caught.value)
    assert "train.dtype: bfloat16" in message and "resources.workers:" in message
    assert "train.mixed_precision:" not in message and "train.activation_checkpointing:" not in message

    # activation-bound (8 FSDP2 workers, 8 x 4096 tokens each): precision, checkpointing and the batch help
    busy = estimate(
        dims_8b, strategy="fsdp2", workers=8, activation_checkpointing=False, batch_size=8, max_length=4096
    )
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(busy, DEVICE_80G)
    message = str(caught.value)
    for fix in ("train.mixed_precision: bf16", "train.activation_checkpointing: true", "train.batch_size:"):
        assert fix in message
    assert all(fix.estimate.total < busy.total for fix in caught.value.fixes)

    tuned = estimate(dims_8b, strategy="fsdp2", workers=2, param_dtype="bfloat16", mixed_precision="bf16")
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(tuned, 20 * GIB)
    message = str(caught.value)
    assert "train.mixed_precision:" not in message
    assert "train.dtype:" not in message
    assert "train.activation_checkpointing:" not in message
    assert "resources.strategy:" not in message  # already fsdp2
    workers = caught.value.fixes[0].estimate.workers
    assert f"resources.workers: {workers}" in message
    assert caught.value.fixes[0].fits


def test_batch_size_fix_is_the_largest_that_fits(dims_8b: ModelDims) -> None:
    run = dict(strategy="fsdp2", workers=8, param_dtype="float32", mixed_precision="bf16", max_length=4096)
    too_big = estimate(dims_8b, batch_size=16, **run)
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(too_big, DEVICE_80G)
    message = str(caught.value)
    batch = int(re.search(r"train\.batch_size: (\d+)", message).group(1))
    accum = int(re.search(r"train\.grad_accum: (\d+)", message).group(1))

    assert 1 <= batch < 16 and batch * accum == 16  # the same sequences per optimizer step
    check_fits(estimate(dims_8b, batch_size=batch, grad_accum=accum, **run), DEVICE_80G)
    larger = [size for size in range(batch + 1, 16) if 16 % size == 0]
    for size in larger:
        with pytest.raises(MemoryPreflightError):
            check_fits(estimate(dims_8b, batch_size=size, grad_accum=16 // size, **run), DEVICE_80G)


def test_a_batch_fix_keeps_the_sequences_of_a_step(dims_8b: ModelDims) -> None:
    """16 sequences a step (8 x 2) and room for a batch of 7: the suggested batch divides 16 (4, with grad_accum
    4), so a step still trains 16 sequences, not 7 x 3."""
    run = dict(strategy="single", param_dtype="bfloat16", mixed_precision="bf16", max_length=4096)
    too_big = estimate(dims_8b, batch_size=8, grad_accum=2, **run)
    budget = estimate(dims_8b, batch_size=7, grad_accum=3, **run).total
    assert budget < too_big.total
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(too_big, budget, headroom=1.0, more_workers=False)
    batch = int(re.search(r"train\.batch_size: (\d+)", str(caught.value)).group(1))
    accum = int(re.search(r"train\.grad_accum: (\d+)", str(caught.value)).group(1))
    assert (batch, accum) == (4, 4)


def test_a_combined_fix_when_no_single_change_fits(dims_8b: ModelDims) -> None:
    hopeless_alone = estimate(
        dims_8b, strategy="single", param_dtype="float32", activation_checkpointing=False, batch_size=4
    )
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(hopeless_alone, DEVICE_80G)
    error = caught.value
    assert not any(fix.fits for fix in error.fixes[:-1])
    combined_line = next(line for line in str(error).splitlines() if "(fits)" in line)
    settings = dict(re.findall(r"([a-z_.]+): (\w+)", combined_line))

    assert {"train.mixed_precision", "train.activation_checkpointing", "resources.workers"} <= set(settings)
    rebuilt = estimate(
        dims_8b,
        strategy=settings["resources.strategy"],
        workers=int(settings["resources.workers"]),
        param_dtype=settings.get("train.dtype", "float32"),
        mixed_precision=settings["train.mixed_precision"],
        activation_checkpointing=settings["train.activation_checkpointing"] == "true",
        batch_size=int(settings.get("train.batch_size", 4)),
        grad_accum=int(settings.get("train.grad_accum", 1)),
    )
    check_fits(rebuilt, DEVICE_80G)


def test_without_more_workers_the_fixes_say_what_is_left(dims_8b: ModelDims) -> None:
    planted = estimate(dims_8b, strategy="single", param_dtype="float32")
    with pytest.raises(MemoryPreflightError) as caught:
        check_fits(planted, 24 * GIB, device="memory per process", more_workers=False)
    message = str(caught.value)
    assert "resources.workers:" not in message
    assert "24.00 GiB memory per process" in message
    assert "none of these fits on this memory" in message


def test_headroom_is_the_share_of_device_memory_used(dims_8b: ModelDims) -> None:
    run = estimate(dims_8b, strategy="fsdp2", workers=8, mixed_precision="bf16")
    device = int(run.total / 0.95)
    check_fits(run, device, headroom=1.0)
    with pytest.raises(MemoryPreflightError, match="90% of"):
        check_fits(run, device, headroom=0.9)


# --- the sweep: the paper's 8B GPU config ----------------------------------------------------------------------


def paper_8b_variant(**changes: object) -> object:
    from rpsft.sweeps.config.sweep import parse_sweep_config

    raw = yaml.safe_load(PAPER_8B_GPU.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[key] = value
    return parse_sweep_config(raw, "paper-8b-gpu variant")


def test_paper_8b_gpu_config_fits_8_gpus_of_80g(dims_8b: ModelDims) -> None:
    from rpsft.sweeps import preflight
    from rpsft.sweeps.config.sweep import load_sweep_config

    config = load_sweep_config(PAPER_8B_GPU)
    assert config.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert config.data.startswith("hf:")
    resources = config.resources
    assert (resources.workers, resources.gpus_per_worker, resources.strategy, resources.cpus) == (
        8,
        1,
        "fsdp2",
        8,
    )
    assert config.train["mixed_precision"] == "bf16" and config.train["activation_checkpointing"] is True

    lines: list[str] = []
    check = preflight.check_memory(
        config, {"GPU": 8.0, "CPU": 64.0}, device_bytes=DEVICE_80G, dims=dims_8b, echo=lines.append
    )
    assert check is not None and check.budget == int(0.9 * DEVICE_80G)
    assert check.estimate.strategy == "fsdp2" and check.estimate.workers == 8
    assert check.estimate.total < check.budget
    # the largest trial is the space's widest bases: k: auto (counted at a quarter of each rank) on all layers
    assert check.where == "space.k auto, space.layers all"
    assert lines and "memory preflight" in lines[0] and check.where in lines[0]
    preflight.check_resources(config, {"GPU": 8.0, "CPU": 64.0})


def test_paper_8b_gpu_config_in_one_float32_process_is_refused_with_the_fix(dims_8b: ModelDims) -> None:
    from rpsft.sweeps import preflight

    planted = paper_8b_variant(resources={"workers": 1, "gpus": 1, "cpus": 8}, train__mixed_precision="no")
    with pytest.raises(SweepConfigError) as caught:
        preflight.check_memory(planted, {"GPU": 1.0, "CPU": 64.0}, device_bytes=DEVICE_80G, dims=dims_8b)
    message = str(caught.value)
    assert "references[1] (l2-init)" in message  # W0 of every matrix is the largest trial's extra
    assert "resources.workers 1 (one process), train.dtype float32, train.mixed_precision no" in message
    assert re.search(r"optimizer step +\d+\.\d\d\n", message)
    workers = int(re.search(r"resources\.workers: (\d+), resources\.strategy: fsdp2", message).group(1))
    assert "resources.gpus_per_worker: 1, resources.gpus: 0" in message
    fixed = paper_8b_variant(
        resources={"workers": workers, "gpus_per_worker": 1, "strategy": "fsdp2", "cpus": 8},
        train__mixed_precision="no",
    )
    assert preflight.check_memory(fixed, {"GPU": 64.0}, device_bytes=DEVICE_80G, dims=dims_8b) is not None


def test_check_resources_counts_every_worker_of_a_trial() -> None:
    from rpsft.sweeps import preflight
    from rpsft.sweeps.config.sweep import load_sweep_config

    config = load_sweep_config(PAPER_8B_GPU)
    with pytest.raises(SweepConfigError, match=r"8 workers .* \(8 GPUs\) but the Ray cluster has 4.*<= 4"):
        preflight.check_resources(config, {"GPU": 4.0, "CPU": 64.0})
    with pytest.raises(SweepConfigError, match=r"resources.cpus: .* \(64 CPUs\) but the Ray cluster has 32"):
        preflight.check_resources(config, {"GPU": 8.0, "CPU": 32.0})


def test_check_memory_skips_with_a_warning_when_the_sizes_are_unknown() -> None:
    from rpsft.sweeps import preflight

    config = paper_8b_variant(model="no-such-org/no-such-model")
    with pytest.warns(MemoryPreflightWarning, match="no-such-org/no-such-model"):
        assert preflight.check_memory(config, {"GPU": 8.0, "CPU": 64.0}) is None


def test_trials_sharing_a_gpu_share_its_memory(monkeypatch, dims_8b: ModelDims) -> None:
    from rpsft.sweeps import preflight

    asked: list[float] = []
    monkeypatch.setattr(preflight, "gpu_memory_bytes", lambda gpus: asked.append(gpus) or 141 * GIB)
    small = dict(train__batch_size=1, train__grad_accum=1, references=["sft"], search={"num_trials": 0})
    config = paper_8b_variant(resources={"gpus": 0.5, "cpus": 8}, concurrency=2, **small)
    with pytest.raises(SweepConfigError, match=r"70\.50 GiB GPU memory \(0\.5 of a 141 GiB GPU\)"):
        preflight.check_memory(config, {"GPU": 1.0, "CPU": 16.0}, dims=dims_8b)
    assert asked == [0.5]
    alone = paper_8b_variant(resources={"gpus": 1, "cpus": 8}, train__dtype="bfloat16", **small)
    check = preflight.check_memory(alone, {"GPU": 1.0, "CPU": 16.0}, dims=dims_8b)
    assert check is not None and check.device_bytes == 141 * GIB and check.device == "GPU memory"


def test_a_gpu_that_does_not_answer_skips_the_check(monkeypatch, dims_8b: ModelDims) -> None:
    from rpsft.sweeps import preflight

    def no_gpu(gpus: float) -> int:
        raise TimeoutError("no GPU task ran within 120 s")

    monkeypatch.setattr(preflight, "gpu_memory_bytes", no_gpu)
    config = paper_8b_variant()
    with pytest.warns(MemoryPreflightWarning, match="no GPU task ran within 120 s"):
        assert preflight.check_memory(config, {"GPU": 8.0, "CPU": 64.0}, dims=dims_8b) is None


# --- the sweep on a real local Ray (CPU) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cpu():
    """A local Ray with 2 CPUs (or the one already running): its cluster resources."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield dict(ray.cluster_resources())
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> Path:
    """A tiny Llama's config.json alone: the preflight reads nothing else."""
    path = tmp_path_factory.mktemp("config-only") / "tiny-llama"
    tiny_config().save_pretrained(path)
    return path


def tiny_sweep(name: str, model_dir: Path, root: Path, **overrides: object):
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from sweep_helpers import sweep_dict

    return parse_sweep_config(sweep_dict(name, model_dir, root, **overrides), name)


@pytest.mark.integration
def test_a_tiny_sweep_fits_the_node_memory_ray_reports(ray_cpu, config_only_model, tmp_path) -> None:
    import ray
    from rpsft.sweeps import preflight

    config = tiny_sweep("memory-ok", config_only_model, tmp_path)
    lines: list[str] = []
    check = preflight.check_memory(config, ray_cpu, echo=lines.append)

    node = max(float(n["Resources"].get("memory", 0)) for n in ray.nodes() if n["Alive"])
    assert check is not None and check.device_bytes == int(node)  # one trial of one process at a time
    assert check.device.startswith("node memory per process (1 process(es) at once)")
    assert check.estimate.total < 64 << 20 and "memory preflight" in lines[0]
    two_at_once, _ = preflight.cpu_memory_per_process(config, ray_cpu, concurrency=2)
    assert two_at_once == int(node / 2)  # 2 CPUs hold two 1-CPU trials


@pytest.mark.integration
@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
def test_a_sweep_that_cannot_fit_fails_before_any_trial(ray_cpu, config_only_model, tmp_path) -> None:
    from rpsft.sweeps.store.sweep_store import SweepStore
    from sweep_helpers import run_quietly, sweep_dict

    # 100,000 sequences of 1024 tokens per worker: the logits alone need 12 x 1024 x 256 B = 3 MiB a sequence
    raw = sweep_dict(
        "memory-planted", config_only_model, tmp_path, train={"max_length": 1024, "batch_size": 100_000}
    )
    with pytest.raises(SweepConfigError) as caught:
        run_quietly(raw)
    message = str(caught.value)
    assert "memory preflight" in message and "node memory per process" in message
    assert "train.batch_size: 100000 (train.grad_accum" not in message
    batch = int(re.search(r"train\.batch_size: (\d+), train\.grad_accum: (\d+)", message).group(1))
    assert 1 <= batch < 100_000 and "(fits)" in message
    assert "resources.workers:" not in message  # more processes on one node share its memory
    store = SweepStore(tmp_path / "sweeps", "memory-planted")
    assert not store.trial_dir("x").parent.exists()
    assert not (store.dir / "tune").exists()


# --- estimate against measurement ----------------------------------------------------------------------------


def test_measure_peak_bytes_counts_external_and_new_tensors() -> None:
    held = torch.zeros(1 << 18)  # 1 MiB made outside

    def allocate() -> None:
        first = torch.ones(1 << 19)  # 2 MiB
        second = first * 2  # 2 MiB more while first is alive
        del first, second

    assert measure_peak_bytes(allocate, held) == (1 << 20) + 2 * (2 << 20)
    assert measure_peak_bytes(allocate) == 2 * (2 << 20)


def one_measured_step(config: LlamaConfig, dtype: torch.dtype, batch: int, length: int, **flags: bool) -> int:
    """Peak tensor bytes of a steady-state training step (after one warm-up step made the AdamW states)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    if flags.get("checkpointing"):
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # foreach, as on GPU
    ids = torch.randint(0, config.vocab_size, (batch, length))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=flags.get("autocast", False)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return measure_peak_bytes(step, model, optimizer, ids)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize(
    ("param_dtype", "mixed_precision"),
    [("float32", None), ("bfloat16", None), ("float32", "bf16")],
    ids=["fp32", "bf16", "autocast"],
)
def test_estimate_is_within_25_percent_of_a_measured_step(
    checkpointing: bool, param_dtype: str, mixed_precision: str | None
) -> None:
    config = tiny_config()
    measured = one_measured_step(
        config,
        getattr(torch, param_dtype),
        batch=4,
        length=64,
        checkpointing=checkpointing,
        autocast=mixed_precision == "bf16",
    )
    predicted = estimate_worker_memory(
        model_dims(config),
        workers=1,
        strategy="single",
        param_dtype=param_dtype,  # type: ignore[arg-type]
        mixed_precision=mixed_precision,  # type: ignore[arg-type]
        batch_size=4,
        max_length=64,
        activation_checkpointing=checkpointing,
        repeat_kv=False,  # no attention mask: SDPA takes the grouped keys and values as they are
    )
    assert predicted.total == pytest.approx(measured, rel=0.25), (predicted.breakdown(), measured)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_estimate_of_a_padded_batch_with_the_token_loss(checkpointing: bool) -> None:
    """The trainer's own loss (:func:`rpsft.core.losses.token_logprobs`) on a padded batch: with an attention
    mask transformers repeats the keys and values to the query width, which ``repeat_kv`` counts."""
    from rpsft.core.losses import sft_loss, token_logprobs

    config = tiny_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    if checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, config.vocab_size, (4, 64))
    mask = torch.ones_like(ids)
    mask[0, 48:] = 0  # one padded row: the batch carries a mask

    def step() -> None:
        logp, scored = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
        sft_loss(logp, scored).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    measured = measure_peak_bytes(step, model, optimizer, ids, mask)
    predicted = estimate_worker_memory(
        model_dims(config),
        workers=1,
        strategy="single",
        param_dtype="float32",
        mixed_precision=None,
        batch_size=4,
        max_length=64,
        activation_checkpointing=checkpointing,
    )
    assert predicted.total == pytest.approx(measured, rel=0.25), (predicted.breakdown(), measured)


def test_estimate_of_an_optimizer_bound_step() -> None:
    config = tiny_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=1024)
    measured = one_measured_step(config, torch.float32, batch=2, length=128)
    predicted = estimate_worker_memory(
        model_dims(config),
        workers=1,
        strategy="single",
        param_dtype="float32",
        mixed_precision=None,
        batch_size=2,
        max_length=128,
        activation_checkpointing=False,
        repeat_kv=False,
    )
    assert predicted.optimizer_step_peak > predicted.forward_backward_peak
    assert predicted.total == pytest.approx(measured, rel=0.25), (predicted.breakdown(), measured)


def test_memory_modules_import_no_service_package() -> None:
    sources = sorted((Path(__file__).resolve().parents[1] / "rpsft_core" / "memory").glob("*.py"))
    assert sources
    names = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    assert not names & {"ray", "mlflow"}

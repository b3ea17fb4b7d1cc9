import pytest
from rpsft.core.models import tiny_model
from rpsft.core.selection import PRESETS, LayerSpec, select_matrices


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_model(request.param)


def _kinds(names):
    return {n.split(".")[-2] for n in names}


def test_all_selects_every_block_matrix_but_not_embeddings(model):
    names = list(select_matrices(model, "all"))
    assert len(names) == 3 * 7
    assert _kinds(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_attn_mlp_early_attn_presets(model):
    assert _kinds(select_matrices(model, "attn")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert _kinds(select_matrices(model, "mlp")) == {"gate_proj", "up_proj", "down_proj"}
    early = select_matrices(model, "early-attn")
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in early} == {0}
    assert len(early) == 4


def test_spec_by_type_range_and_regex(model):
    spec = {"types": ["q", "v"], "layers": "1:3"}
    names = list(select_matrices(model, spec))
    assert names == [f"model.layers.{i}.self_attn.{t}_proj.weight" for i in (1, 2) for t in ("q", "v")]
    assert list(select_matrices(model, {"layers": "-1:", "types": ["down"]})) == [
        "model.layers.2.mlp.down_proj.weight"
    ]
    assert len(select_matrices(model, {"regex": r"layers\.0\..*up_proj"})) == 1


def test_embeddings_only_on_request_and_tied_once(model):
    names = list(select_matrices(model, {"types": ["embed", "lm_head"]}))
    assert names == ["model.embed_tokens.weight"]  # lm_head is tied to the embeddings: one parameter
    assert len(select_matrices(model, "all+embed")) == 3 * 7 + 1


def test_errors_name_the_field(model):
    with pytest.raises(ValueError, match="layers: unknown preset 'nope'"):
        select_matrices(model, "nope")
    with pytest.raises(ValueError, match="layers: the selection .* matches no weight matrix"):
        select_matrices(model, {"regex": "no_such_module"})
    with pytest.raises(ValueError, match="start:end"):
        LayerSpec(layers="3")
    with pytest.raises(ValueError):
        LayerSpec(types=["qq"])


def test_presets_are_valid_on_both_families(model):
    for name in PRESETS:
        assert select_matrices(model, name)

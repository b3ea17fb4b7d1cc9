"""The dequantized-model cache checks its own content: a truncated or altered file, a missing file or a marker
from an older format makes it dequantize again, and the model it then loads equals the original."""

import json

import pytest
import torch
from rpsft.core.models import EMBEDDED_MODELS, cache_is_intact, load_model, resolve_model_dir

pytestmark = pytest.mark.slow

WEIGHT = "model.layers.3.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return EMBEDDED_MODELS["smollm2-135m-instruct"].locate_gguf(tmp_path_factory.mktemp("gguf"))


def _weight(directory: str) -> torch.Tensor:
    model, _ = load_model(directory)
    return dict(model.named_parameters())[WEIGHT].detach().clone()


def _damage_truncate(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_flip_a_byte(directory):  # same size: only the hash can tell
    path = directory / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _damage_delete(directory):
    (directory / "config.json").unlink()


def _damage_old_marker(directory):
    (directory / "rpsft_cache.json").write_text(json.dumps({"source": "x"}))  # the format before hashes


def test_a_damaged_model_cache_is_detected_and_rebuilt(tmp_path, gguf, capsys):
    import shutil
    from pathlib import Path

    directory = Path(resolve_model_dir(gguf, cache_dir=tmp_path))
    marker = json.loads((directory / "rpsft_cache.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["sha256"])
    assert cache_is_intact(directory)
    original = _weight(str(directory))
    digests = marker["sha256"]
    pristine = tmp_path / "pristine"
    shutil.copytree(directory, pristine)
    for damage in (_damage_flip_a_byte, _damage_delete, _damage_old_marker):  # each detected
        damage(directory)
        assert not cache_is_intact(directory), damage.__name__
        shutil.rmtree(directory)
        shutil.copytree(pristine, directory)
        assert cache_is_intact(directory)
    capsys.readouterr()
    _damage_truncate(directory)  # and a damaged cache is rebuilt, not loaded
    assert not cache_is_intact(directory)
    assert resolve_model_dir(gguf, cache_dir=tmp_path) == str(directory)
    assert "fails its content check; dequantizing again" in capsys.readouterr().err
    assert cache_is_intact(directory)
    assert json.loads((directory / "rpsft_cache.json").read_text())["sha256"] == digests
    assert torch.equal(_weight(str(directory)), original)
    assert resolve_model_dir(gguf, cache_dir=tmp_path) == str(directory)  # intact now: loaded, not rebuilt
    assert "dequantizing again" not in capsys.readouterr().err

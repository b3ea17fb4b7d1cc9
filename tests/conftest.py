import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

PAPER_DATA = Path(__file__).resolve().parents[2] / "shared" / "paper-data"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """Tokenizer of the embedded SmolLM2-135M-Instruct (real chat template)."""
    from rpsft.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model_dir():
    """Cached HF directory of the embedded SmolLM2-135M-Instruct (dequantized on first use)."""
    from rpsft.core.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random-init Llama saved with the SmolLM2 tokenizer, one per test module."""
    from sweep_helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model"), smol_tokenizer)


@pytest.fixture
def fresh_ray():
    """The test starts its own Ray (so the workers see the test's environment, e.g. PYTHONPATH for trial hooks)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory, smol_tokenizer):
    """One small finished sweep over a tiny Llama (SQLite MLflow + Optuna, intermediate evaluations, per-trial
    rotation), shared by the report and MLflow UI tests: ``(outcome, root)``; the sweeps live in root/sweeps."""
    if not PAPER_DATA.is_dir():
        pytest.skip("shared/paper-data is not present")
    from sweep_helpers import run_quietly, sweep_dict, tiny_model_dir

    root = tmp_path_factory.mktemp("finished-sweep")
    model_dir = tiny_model_dir(root, smol_tokenizer)
    raw = sweep_dict(
        "tiny",
        model_dir,
        root,
        evaluation={"every": 1, "rotation": True, "rotation_top_k": 16},
        search={"num_trials": 2, "seed": 0},
    )
    outcome = run_quietly(raw)
    yield outcome, root
    import ray

    if ray.is_initialized():
        ray.shutdown()

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
    from rpsft_core.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model_dir():
    """Cached HF directory of the embedded SmolLM2-135M-Instruct (dequantized on first use)."""
    from rpsft_core.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

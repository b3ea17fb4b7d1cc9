"""The choice of lm-eval backend (vLLM where it is installed and a GPU is present, else Hugging Face) and the
arguments rpsft hands lm-eval's ``VLLM``, checked on a CPU: the environment is faked, the signature is read from
lm-eval's source (its vLLM module imports vLLM at the top, so it cannot be imported here)."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import lm_eval
import pytest
from rpsft.evaluation import backends
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.settings import EvalSettings


@pytest.fixture()
def machine(monkeypatch):
    """Set what the machine has: ``machine(vllm=True, gpus=2)``."""

    def set_(vllm: bool, gpus: int) -> None:
        monkeypatch.setattr(backends, "vllm_installed", lambda: vllm)
        monkeypatch.setattr(backends, "cuda_gpus", lambda: gpus)

    return set_


@pytest.mark.parametrize(
    ("vllm", "gpus", "model", "expected"),
    [
        (True, 1, "smollm2-135m-instruct", "vllm"),
        (True, 0, "smollm2-135m-instruct", "hf"),  # no GPU
        (False, 4, "smollm2-135m-instruct", "hf"),  # not installed
        (True, 1, object(), "hf"),  # an in-memory model (a sweep's trial)
    ],
)
def test_auto_uses_vllm_only_when_installed_with_a_gpu_for_a_named_model(
    machine, vllm, gpus, model, expected
):
    machine(vllm, gpus)
    assert backends.resolve_backend("auto", model) == expected
    assert backends.resolve_backend("hf", model) == "hf"


def test_forcing_vllm_without_it_or_with_an_in_memory_model_is_refused(machine):
    machine(False, 1)
    with pytest.raises(EvalConfigError, match="backend: vllm is not installed. Fix: pip install vllm"):
        backends.resolve_backend("vllm", "m")
    machine(True, 1)
    with pytest.raises(EvalConfigError, match="in-memory model needs the hf backend"):
        backends.resolve_backend("vllm", object())
    assert backends.resolve_backend("vllm", Path("some/dir")) == "vllm"


def _vllm_init_parameters() -> tuple[set[str], bool]:
    """The named parameters of lm-eval's ``VLLM.__init__`` and whether it takes ``**kwargs`` (read from source)."""
    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VLLM")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = {a.arg for a in init.args.args + init.args.kwonlyargs}
    return names, init.args.kwarg is not None


def test_the_vllm_arguments_are_lm_evals_and_leave_generation_lengths_to_the_tasks(machine):
    machine(True, 2)
    settings = EvalSettings(seed=7, max_new_tokens=64)
    arguments = backends.vllm_arguments("/models/m", settings)
    named, takes_kwargs = _vllm_init_parameters()
    assert set(arguments) - {"gpu_memory_utilization"} <= named  # the rest goes to vllm.LLM through **kwargs
    assert takes_kwargs
    assert arguments["tensor_parallel_size"] == 1 and arguments["seed"] == 7
    assert "max_gen_toks" not in arguments  # the tasks' own, or lm-eval's default as for HFLM
    assert arguments["pretrained"] == "/models/m" and arguments["batch_size"] == "auto"


def test_make_lm_builds_lm_evals_vllm_model_for_a_named_model(machine, monkeypatch):
    from rpsft.evaluation import runner

    built = {}

    class FakeVLLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = FakeVLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", module)
    import rpsft.core.models

    monkeypatch.setattr(rpsft.core.models, "resolve_model_dir", lambda name: f"/resolved/{name}")
    machine(True, 1)
    lm = runner.make_lm("smollm2-135m-instruct", None, EvalSettings())
    assert isinstance(lm, FakeVLLM) and built["pretrained"] == "/resolved/smollm2-135m-instruct"


def test_the_backend_is_part_of_the_base_score_cache_key(tmp_path):
    from rpsft.evaluation.lm_eval_tasks import plan_config_hash
    from rpsft.evaluation.settings import plan_evaluation

    rows = '{"prompt": "What is 1+1?", "reward_model": {"ground_truth": "2"}}\n'
    (tmp_path / "m.jsonl").write_text(rows)
    entry = {"name": "m", "suite": "id", "scorer": "math", "file": "m.jsonl"}
    plan = plan_evaluation(EvalSettings(suite=["m"], data_dir=str(tmp_path), benchmarks=[entry]))
    assert plan_config_hash(plan, "hf") != plan_config_hash(plan, "vllm")

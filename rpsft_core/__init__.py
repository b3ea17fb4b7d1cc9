"""rpsft.core: Rotation-Preserving Supervised Fine-Tuning as a library.

model, tokenizer = load_model("smollm2-135m-instruct")
selection = select_matrices(model, "all")          # {name: Parameter}
bases = compute_bases(selection, k=64)             # Uk, Vk, Sref per matrix
reg = RPSFTRegularizer(bases, lam=1.0)
...                                                # micro-batch backward passes
reg.add_grad_()                                    # once per optimizer step, before clipping
optimizer.step()
"""

from types import ModuleType

# Public names -> defining module; imported on first use so `rpsft --help` does not pay for torch.
_EXPORTS = {
    "Bases": "bases",
    "compute_bases": "bases",
    "load_bases": "bases",
    "load_or_compute_bases": "bases",
    "save_bases": "bases",
    "TrainConfig": "config",
    "load_train_config": "config",
    "load_model": "models",
    "load_tokenizer": "models",
    "tiny_model": "models",
    "AutoK": "k_spec",
    "parse_k_spec": "k_spec",
    "resolve_auto_k": "rank_rule",
    "RPSFTRegularizer": "regularizer",
    "find_lora_parts": "regularizer",
    "PRESETS": "selection",
    "LayerSpec": "selection",
    "select_matrices": "selection",
    "TrainResult": "train",
    "train": "train",
    "RPSFTCallback": "trainer",
    "RPSFTTrainer": "trainer",
}
__all__ = sorted(_EXPORTS)


def _defining_module(module: str) -> ModuleType:
    """The submodule ``rpsft.core.<module>``, each named by a plain import (no import by string)."""
    if module == "bases":
        import rpsft.core.bases as loaded
    elif module == "config":
        import rpsft.core.config as loaded
    elif module == "k_spec":
        import rpsft.core.k_spec as loaded
    elif module == "models":
        import rpsft.core.models as loaded
    elif module == "rank_rule":
        import rpsft.core.rank_rule as loaded
    elif module == "regularizer":
        import rpsft.core.regularizer as loaded
    elif module == "selection":
        import rpsft.core.selection as loaded
    elif module == "train":
        import rpsft.core.train as loaded
    else:
        import rpsft.core.trainer as loaded
    return loaded


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_defining_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rpsft.core' has no attribute {name!r}")

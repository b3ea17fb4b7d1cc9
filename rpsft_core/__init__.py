"""rpsft_core: Rotation-Preserving Supervised Fine-Tuning as a library.

model, tokenizer = load_model("smollm2-135m-instruct")
selection = select_matrices(model, "all")          # {name: Parameter}
bases = compute_bases(selection, k=64)             # Uk, Vk, Sref per matrix
reg = RPSFTRegularizer(bases, lam=1.0)
...                                                # micro-batch backward passes
reg.add_grad_()                                    # once per optimizer step, before clipping
optimizer.step()
"""

from importlib import import_module

# Public names -> defining module; imported on first use so `rpsft --help` does not pay for torch.
_EXPORTS = {
    "Bases": "rpsft_core.bases",
    "compute_bases": "rpsft_core.bases",
    "load_bases": "rpsft_core.bases",
    "load_or_compute_bases": "rpsft_core.bases",
    "save_bases": "rpsft_core.bases",
    "TrainConfig": "rpsft_core.config",
    "load_train_config": "rpsft_core.config",
    "load_model": "rpsft_core.models",
    "load_tokenizer": "rpsft_core.models",
    "tiny_model": "rpsft_core.models",
    "AutoK": "rpsft_core.rank_rule",
    "parse_k_spec": "rpsft_core.rank_rule",
    "resolve_auto_k": "rpsft_core.rank_rule",
    "RPSFTRegularizer": "rpsft_core.regularizer",
    "find_lora_parts": "rpsft_core.regularizer",
    "PRESETS": "rpsft_core.selection",
    "LayerSpec": "rpsft_core.selection",
    "select_matrices": "rpsft_core.selection",
    "TrainResult": "rpsft_core.train",
    "train": "rpsft_core.train",
    "RPSFTCallback": "rpsft_core.trainer",
    "RPSFTTrainer": "rpsft_core.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rpsft_core' has no attribute {name!r}")

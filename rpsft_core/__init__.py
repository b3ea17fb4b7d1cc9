"""rpsft_core: Rotation-Preserving Supervised Fine-Tuning as a library.

model, tokenizer = load_model("smollm2-135m-instruct")
selection = select_matrices(model, "all")          # {name: Parameter}
bases = compute_bases(selection, k=64)             # Uk, Vk, Sref per matrix
reg = RPSFTRegularizer(bases, lam=1.0)
...                                                # micro-batch backward passes
reg.add_grad_()                                    # once per optimizer step, before clipping
optimizer.step()
"""

from rpsft_core.bases import Bases, compute_bases, load_bases, load_or_compute_bases, save_bases
from rpsft_core.config import TrainConfig, load_train_config
from rpsft_core.models import load_model, load_tokenizer, tiny_model
from rpsft_core.regularizer import RPSFTRegularizer, find_lora_parts
from rpsft_core.selection import PRESETS, LayerSpec, select_matrices
from rpsft_core.train import TrainResult, train
from rpsft_core.trainer import RPSFTCallback, RPSFTTrainer

__all__ = [
    "PRESETS",
    "Bases",
    "LayerSpec",
    "RPSFTCallback",
    "RPSFTRegularizer",
    "RPSFTTrainer",
    "TrainConfig",
    "TrainResult",
    "compute_bases",
    "find_lora_parts",
    "load_bases",
    "load_model",
    "load_or_compute_bases",
    "load_tokenizer",
    "load_train_config",
    "save_bases",
    "select_matrices",
    "tiny_model",
    "train",
]

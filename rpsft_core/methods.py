"""Set a model up for one training method: which parameters train, which penalty and which loss apply.

| method       | parameters trained          | penalty                         | loss |
|--------------|-----------------------------|---------------------------------|------|
| sft          | all                         | none                            | NLL  |
| rpsft        | all                         | top-k block, rank ``k``         | NLL  |
| l2-init      | all                         | ``||W - W0||^2`` (full rank)    | NLL  |
| dft          | all                         | none                            | DFT  |
| iw           | all                         | none                            | IW (frozen base as reference) |
| lora         | PEFT LoRA adapters (r = 32) | none                            | NLL  |
| rpsft-lora   | PEFT LoRA adapters          | top-k block on ``W0 + s B A``   | NLL  |
| osf          | PEFT OSF (top-k frozen)     | hard constraint (no penalty)    | NLL  |

LoRA, RPSFT-LoRA and OSF adapters target the selected matrices. ``rpsft`` with ``k = 0`` is exactly ``sft``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rpsft_core.bases import Bases, load_or_compute_bases
from rpsft_core.config import PENALIZED_METHODS, TrainConfig
from rpsft_core.models import default_cache_dir
from rpsft_core.regularizer import RPSFTRegularizer, find_lora_parts


@dataclass
class PreparedMethod:
    model: nn.Module  # the module to train (PEFT-wrapped for adapter methods)
    loss_type: str  # "sft", "dft" or "iw"
    regularizer: RPSFTRegularizer | None
    ref_model: nn.Module | None  # frozen base for "iw"


def module_names(selection: dict[str, nn.Parameter]) -> list[str]:
    return [name.removesuffix(".weight") for name in selection]


def bases_cache_dir(config: TrainConfig) -> Path:
    return (
        Path(config.cache_dir).expanduser() / "bases" if config.cache_dir else default_cache_dir() / "bases"
    )


def prepare_method(
    model: nn.Module,
    config: TrainConfig,
    selection: dict[str, nn.Parameter],
    bases: Bases | None = None,
    progress: bool = False,
) -> PreparedMethod:
    """Wrap/freeze ``model`` for ``config.method``; compute (or reuse) bases and build the regularizer.

    ``bases`` computed at a larger k (e.g. shared by a sweep) are sliced to ``config.effective_k``.
    """
    method = config.method
    regularizer = None
    if method in PENALIZED_METHODS:
        k = config.effective_k
        if bases is None:
            bases = load_or_compute_bases(
                selection, k, cache_dir=bases_cache_dir(config), method=config.basis_method, progress=progress
            )
        else:
            bases = bases.truncate(k)
        bases.bind(selection)
    loss_type = {"dft": "dft", "iw": "iw"}.get(method, "sft")
    ref_model = None
    if method == "iw":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    if method in ("lora", "rpsft-lora"):
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=module_names(selection),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
    elif method == "osf":
        from peft import OSFConfig, get_peft_model

        model = get_peft_model(
            model, OSFConfig(effective_rank=config.k or None, target_modules=module_names(selection))
        )

    if bases is not None:
        lora = find_lora_parts(model, list(bases.entries)) if method == "rpsft-lora" else None
        regularizer = RPSFTRegularizer(bases, config.lam, period=config.period, lora=lora)
    return PreparedMethod(model, loss_type, regularizer, ref_model)

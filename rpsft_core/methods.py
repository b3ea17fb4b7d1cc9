"""Set a model up for one training method: which parameters train, which penalty and which loss apply.

What each method does is the table :data:`rpsft.core.method_table.METHODS`; this module carries it out. LoRA,
RPSFT-LoRA and OSF adapters target the selected matrices. ``rpsft`` with ``k = 0`` is exactly ``sft``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from rpsft.core.bases import Bases, load_or_compute_bases
from rpsft.core.config import TrainConfig
from rpsft.core.models import default_cache_dir
from rpsft.core.regularizer import RPSFTRegularizer, find_lora_parts
from torch import nn


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


def add_adapters(model: nn.Module, config: TrainConfig, selection: dict[str, nn.Parameter]) -> nn.Module:
    """``model`` wrapped in the PEFT adapters of ``config.method`` on the selected matrices (LoRA: rank
    ``lora_r``, ``lora_alpha``, no dropout; OSF: ``effective_rank`` k), or ``model`` itself for a method
    without adapters. The base weights stay the same parameters; the adapters' initialization draws from
    torch's global generator."""
    adapter = config.spec.adapter
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=module_names(selection),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_config)
    if adapter == "osf":
        from peft import OSFConfig, get_peft_model

        return get_peft_model(
            model, OSFConfig(effective_rank=config.k or None, target_modules=module_names(selection))
        )
    return model


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
    spec = config.spec
    regularizer = None
    if spec.uses_bases:
        k = config.effective_k
        if bases is None:
            bases = load_or_compute_bases(
                selection, k, cache_dir=bases_cache_dir(config), method=config.basis_method, progress=progress
            )
        else:
            bases = bases.truncate(k)
        bases.bind(selection)
    ref_model = None
    if spec.reference_model:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    model = add_adapters(model, config, selection)

    if bases is not None:
        lora = find_lora_parts(model, list(bases.entries)) if spec.adapter == "lora" else None
        regularizer = RPSFTRegularizer(
            bases, config.lam, period=config.period, lora=lora, mode=config.penalty_mode
        )
    return PreparedMethod(model, spec.loss, regularizer, ref_model)

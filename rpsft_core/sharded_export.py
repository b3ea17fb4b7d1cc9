"""The consolidated model a sharded run writes at the end: an HF checkpoint (safetensors, config, tokenizer)
gathered to rank 0 that :func:`rpsft.core.models.load_model` reads; for LoRA its weights are the merged
``W0 + s B A`` (as ``merge_and_unload`` gives).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from rpsft.core.distributed import barrier, world
from rpsft.core.fsdp import CHECKPOINT_PREFIX
from torch import nn


def tied_aliases(model: nn.Module) -> set[str]:
    """The names (wrapper prefixes removed) under which a parameter appears a second time: a tied output
    head, saved once under its first name as Hugging Face checkpoints are."""
    seen: set[int] = set()
    aliases: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name.replace(CHECKPOINT_PREFIX, ""))
        seen.add(id(param))
    return aliases


PEFT_PREFIX = "base_model.model."


def merged_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state of a PEFT LoRA model (plain names, as :func:`save_consolidated` gathers it) as the state
    of its base model with every active adapter merged: ``W0 + s B A`` under the name of ``W0``, computed as
    PEFT's ``merge_and_unload`` does (``(B @ A) * s`` in the adapter's dtype, through float32 for a
    bfloat16/float16 adapter on CPU, added to ``W0`` in place). The adapters' own entries are dropped."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    merged = dict(state)
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = module_name.replace(CHECKPOINT_PREFIX, "")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(
                adapter
            ):
                raise ValueError(
                    f"lora: {name} uses a LoRA variant or a LoRA bias, which the consolidated checkpoint does "
                    "not merge. Fix: plain LoRA adapters (no DoRA, no lora_bias)"
                )
            a = merged[f"{name}.lora_A.{adapter}.weight"]
            b = merged[f"{name}.lora_B.{adapter}.weight"]
            dtype = b.dtype
            cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
            if cast:
                a, b = a.float(), b.float()
            delta = transpose(b @ a, module.fan_in_fan_out) * module.scaling[adapter]
            if cast:
                delta = delta.to(dtype)
            key = f"{name}.base_layer.weight"
            merged[key] = merged[key].clone().add_(delta)
    out = {}
    for key, tensor in merged.items():
        if ".lora_" in key:
            continue
        plain = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        out[plain] = tensor
    return out


def save_consolidated(model: nn.Module, inner: nn.Module, tokenizer: Any, target: Path) -> Path | None:
    """Gather the full weights to rank 0's CPU (collective) and write an HF checkpoint there: safetensors,
    config, tokenizer. ``inner`` is the unwrapped model (the FSDP2 root itself, or DDP's ``module``); a PEFT
    LoRA model is saved as its base model with the adapters merged (:func:`merged_lora_state`).
    Returns ``target`` on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = world()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if rank == 0:
        aliases = tied_aliases(inner)
        state = {name.replace(CHECKPOINT_PREFIX, ""): t for name, t in state.items() if name not in aliases}
        base = inner
        if hasattr(inner, "get_base_model"):  # PEFT
            state = merged_lora_state(inner, state)
            base = inner.get_base_model()
        if target.exists():
            shutil.rmtree(target)
        base.save_pretrained(target, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(target)
        out = target
    del state
    barrier()
    return out

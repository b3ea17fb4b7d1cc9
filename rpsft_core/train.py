"""One training run from a :class:`TrainConfig`: data -> model -> method -> Trainer -> checkpoint + metrics.

Checks that can fail cheaply run first (config, data, layer selection), before any training step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rpsft.core.bases import Bases
from rpsft.core.config import TrainConfig
from rpsft.core.data import SFTCollator, build_sft_dataset, load_examples
from rpsft.core.methods import prepare_method
from rpsft.core.models import drop_autocast_wrapper, load_model, load_tokenizer
from rpsft.core.precision import resolve_mixed_precision
from rpsft.core.rank_rule import resolve_k_from_prompts
from rpsft.core.selection import select_matrices
from rpsft.core.trainer import RPSFTTrainer
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)


@dataclass
class TrainResult:
    model: PreTrainedModel  # the trained model, adapters merged
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, Any]
    output_dir: Path
    drift: dict[str, float] = field(default_factory=dict)


def training_arguments(config: TrainConfig, progress: bool) -> TrainingArguments:
    precision = resolve_mixed_precision(
        config.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"
    )
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        optim=config.optimizer,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500,
        save_total_limit=1 if config.checkpoint_every else None,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=precision == "bf16" or (config.dtype == "bfloat16" and torch.cuda.is_available()),
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
    )


class StopAtStep(TrainerCallback):
    """Ends training after optimizer step ``step`` (``TrainConfig.stop_at_step``): the schedule, the data order
    and everything else stay those of the full run, so the weights are the full run's at that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("checkpoint-"))


def latest_checkpoint(output_dir: str | Path, up_to: int | None = None) -> Path | None:
    """The newest complete ``checkpoint-<step>`` the Trainer wrote under ``output_dir`` (None if none); with
    ``up_to``, the newest at or before that step."""
    done = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit()
        and (path / "trainer_state.json").is_file()
        and (up_to is None or checkpoint_step(path) <= up_to)
    ]
    return max(done, key=checkpoint_step, default=None)


def train(
    config: TrainConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    bases: Bases | None = None,
    callbacks: list | None = None,
    progress: bool = True,
    print_logs: bool = True,
) -> TrainResult:
    """Train one model as ``config`` says. Pass ``model``/``tokenizer``/``bases`` to reuse loaded ones.
    ``progress``: the Trainer's bar; without it the Trainer prints each log dict, unless ``print_logs`` is
    False (for a caller that shows progress its own way). A callback with a ``bind_regularizer`` method is
    handed the run's regularizer (``None`` for an unpenalized method) before training starts."""
    set_seed(config.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, config.cache_dir)
    examples = load_examples(config.data, limit=config.data_limit, seed=config.seed)
    dataset = build_sft_dataset(examples, tokenizer, config.max_length)
    if model is None:
        model, _ = load_model(config.model, dtype=config.dtype, cache_dir=config.cache_dir)
    args = training_arguments(config, progress)
    model.to(args.device)  # bases are computed where the model trains
    selection = select_matrices(model, config.layers)

    k_resolved = None
    if config.auto_k:  # the energy rule on the base model, as a sweep resolves its k: auto
        k_resolved = resolve_k_from_prompts(model, tokenizer, config.k, config.auto_k_prompts)
    run_config = config if k_resolved is None else config.model_copy(update={"k": k_resolved})
    started = time.perf_counter()
    prepared = prepare_method(model, run_config, selection, bases, progress=progress)
    bases_seconds = time.perf_counter() - started
    callbacks = list(callbacks or [])
    for callback in callbacks:
        if hasattr(callback, "bind_regularizer"):
            callback.bind_regularizer(prepared.regularizer)
    if config.stop_at_step is not None:
        callbacks.append(StopAtStep(config.stop_at_step))
    set_seed(config.seed)
    trainer = RPSFTTrainer(
        model=prepared.model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        regularizer=prepared.regularizer,
        loss_type=prepared.loss_type,
        ref_model=prepared.ref_model,
        iw_tau=config.iw_tau,
        iw_clamp=config.iw_clamp,
        callbacks=callbacks,
    )
    if not progress and not print_logs:
        trainer.remove_callback(PrinterCallback)
    resume_from = (
        latest_checkpoint(config.output_dir, up_to=config.stop_at_step) if config.checkpoint_every else None
    )
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started

    trained = drop_autocast_wrapper(prepared.model)  # score and save in the weights' own dtype
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    drift = prepared.regularizer.drift() if prepared.regularizer is not None else {}
    metrics = {
        "config": config.model_dump(mode="json", by_alias=True),
        "k_resolved": k_resolved,
        "train_loss": output.training_loss,
        "global_steps": output.global_step,
        "train_seconds": train_seconds,
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else 0,
        "bases_seconds": bases_seconds,
        "n_examples": len(dataset),
        "n_dropped_examples": dataset.n_dropped,
        "n_matrices": len(selection),
        "bases_bytes": prepared.regularizer.bases.nbytes() if prepared.regularizer else 0,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",  # as resolved here
        "log_history": trainer.state.log_history,
        "drift": drift,
        "drift_history": trainer.rpsft_callback.history if trainer.rpsft_callback else [],
        "drift_mean": sum(drift.values()) / len(drift) if drift else 0.0,
    }
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.save_model:
        trained.save_pretrained(out_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "model")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(trained, tokenizer, metrics, out_dir, drift)

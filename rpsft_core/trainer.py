"""RPSFT inside the Hugging Face ``Trainer``.

* :class:`RPSFTCallback` drops into any existing ``transformers.Trainer``: it adds the closed-form penalty
  gradient once per optimizer step (``on_pre_optimizer_step``, after gradient accumulation) and adds the
  penalty and drift to the logs. In a stock ``Trainer`` that hook runs *after* gradient clipping.
* :class:`RPSFTTrainer` applies it *before* clipping (micro-batch backward passes -> penalty gradient ->
  clipping -> optimizer step) and implements the SFT, DFT and IW losses.

With a regularizer of ``mode == "decoupled"`` (``penalty_mode: decoupled``) neither adds a gradient: the callback
takes the penalty's proximal step in ``on_optimizer_step``, which the Trainer calls right after
``optimizer.step()`` and before ``lr_scheduler.step()``, so the optimizer's learning rate there is the one the
step used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rpsft.core.losses import LOSS_TYPES, causal_lm_logits, dft_loss, iw_loss, sft_loss, token_logprobs
from rpsft.core.regularizer import RPSFTRegularizer, step_learning_rate
from torch import nn
from transformers import Trainer, TrainerCallback


class RPSFTCallback(TrainerCallback):
    """Adds the RPSFT penalty gradient once per optimizer step (or, decoupled, takes its proximal step after
    the optimizer step) and logs penalty and drift. ``step_skipped``: whether the optimizer step just taken was
    skipped (a loss scaler's inf/NaN step), so that no proximal step follows it."""

    def __init__(self, regularizer: RPSFTRegularizer, step_skipped: Callable[[], bool] | None = None) -> None:
        self.regularizer = regularizer
        self.step_skipped = step_skipped
        self.last_penalty: float | None = None
        self.history: list[dict[str, Any]] = []  # per logging step: penalty and drift per matrix

    @property
    def decoupled(self) -> bool:
        return self.regularizer.mode == "decoupled"

    def apply(self, step: int) -> None:
        """Apply the penalty gradient for optimizer step ``step`` unless already applied (or decoupled)."""
        if self.decoupled or self.regularizer.last_step_applied == step:
            return
        value = self.regularizer.add_grad_(step)
        if value is not None:
            self.last_penalty = value

    def prox(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Decoupled: the proximal step for optimizer step ``step``, at the learning rate ``optimizer`` used."""
        if not self.decoupled or self.regularizer.last_step_applied == step:
            return
        if not self.regularizer.applies_at(step) or (self.step_skipped is not None and self.step_skipped()):
            return
        lr = step_learning_rate(optimizer, self.regularizer.parameters())
        value = self.regularizer.prox_step_(lr, step)
        if value is not None:
            self.last_penalty = value

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.apply(state.global_step)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.decoupled:
            if optimizer is None:
                raise ValueError("penalty_mode: decoupled needs the Trainer's optimizer in on_optimizer_step")
            self.prox(state.global_step, optimizer)

    def log_metrics(self) -> dict[str, float]:
        if self.last_penalty is None:
            return {}
        drift = list(self.regularizer.last_drift().values())
        return {
            "rpsft/penalty": self.last_penalty,
            "rpsft/drift_mean": sum(drift) / len(drift),
            "rpsft/drift_max": max(drift),
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "rpsft/penalty" not in logs:
            logs.update(self.log_metrics())
        if self.last_penalty is not None:
            entry = {"step": state.global_step, "penalty": self.last_penalty, "drift": self.regularizer.last_drift()}
            if not self.history or self.history[-1]["step"] != state.global_step:
                self.history.append(entry)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: training stops at that step (the trial fails, naming it)."""

    def __init__(self, value: float, step: int) -> None:
        self.value, self.step = value, step
        super().__init__(
            f"loss: {value} at optimizer step {step}: training stopped. Fix: a lower learning_rate, "
            "max_grad_norm > 0, or float32 instead of fp16"
        )


class RPSFTTrainer(Trainer):
    """``Trainer`` with the RPSFT penalty applied before clipping and a choice of token loss."""

    def __init__(
        self,
        *args: Any,
        regularizer: RPSFTRegularizer | None = None,
        loss_type: str = "sft",
        ref_model: nn.Module | None = None,
        iw_tau: float = 1.0,
        iw_clamp: float = 16.0,
        **kwargs: Any,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown {loss_type!r}. Fix: one of {', '.join(LOSS_TYPES)}")
        if loss_type == "iw" and ref_model is None:
            raise ValueError("ref_model: IW-SFT needs the frozen base model as reference")
        self.rpsft_callback = (
            RPSFTCallback(regularizer, step_skipped=self._optimizer_step_was_skipped)
            if regularizer is not None
            else None
        )
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.rpsft_callback is not None:
            callbacks.append(self.rpsft_callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.loss_type = loss_type
        self.ref_model = ref_model
        self.iw_tau = iw_tau
        self.iw_clamp = iw_clamp
        if ref_model is not None:
            self.ref_model.to(self.args.device)

    def _optimizer_step_was_skipped(self) -> bool:
        return bool(getattr(self.accelerator, "optimizer_step_was_skipped", False))

    def _clip_grad_norm(self, model):
        if self.rpsft_callback is not None:
            self.rpsft_callback.apply(self.state.global_step)
        return super()._clip_grad_norm(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, labels = causal_lm_logits(model, inputs)  # the prompt positions carry no loss
        logp, mask = token_logprobs(logits, labels)
        if self.loss_type == "sft":
            loss = sft_loss(logp, mask, num_items_in_batch)
        elif self.loss_type == "dft":
            loss = dft_loss(logp, mask, num_items_in_batch)
        else:
            with torch.no_grad():
                ref_logits, _ = causal_lm_logits(self.ref_model, inputs)
                ref_logp, _ = token_logprobs(ref_logits, labels)
            loss = iw_loss(logp, ref_logp, mask, num_items_in_batch, tau=self.iw_tau, clamp=self.iw_clamp)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(float(loss.detach()), self.state.global_step + 1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients (as Trainer.compute_loss)
            loss = loss * self.accelerator.num_processes
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.rpsft_callback is not None and "loss" in logs:
            logs.update(self.rpsft_callback.log_metrics())
        super().log(logs, *args, **kwargs)

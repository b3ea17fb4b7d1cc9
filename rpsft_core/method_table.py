"""The one table of training methods: what each trains, which knobs it reads, its penalty and its loss.

Everything that depends on the method reads it from :data:`METHODS`: config validation
(:class:`rpsft.core.config.TrainConfig`), model set-up (:mod:`rpsft.core.methods`), whether it trains over several
workers (:mod:`rpsft.core.sharded_method`), the memory estimate, the sweep's references and the parameters a
trial logs to MLflow (:func:`MethodSpec.logged_knobs`), and the README's method table (``rpsft methods``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from rpsft.core.losses import LossType

Adapter = Literal["lora", "osf"]
# TrainConfig.penalty_mode: the penalty's gradient before clipping, or its proximal step after the update
PenaltyMode = Literal["loss", "decoupled"]
PENALTY_MODES: tuple[str, ...] = get_args(PenaltyMode)


@dataclass(frozen=True)
class MethodSpec:
    """One training method.

    ``knobs`` are the :class:`~rpsft.core.config.TrainConfig` fields the method reads beyond the shared
    optimization settings (``lambda`` is the field's alias ``lam``); a trial logs exactly these.
    """

    name: str
    summary: str
    trains: str  # which parameters the optimizer updates
    penalty: str  # the regularizer, in words
    loss: LossType = "sft"
    adapter: Adapter | None = None  # PEFT adapter kind, None for full fine-tuning
    uses_k: bool = False  # reads the protected rank k
    uses_lambda: bool = False  # reads lambda (a soft penalty on the protected block)
    full_rank: bool = False  # the penalty covers the whole matrix (k fixed at full rank)
    reference_model: bool = False  # keeps a frozen copy of the base model during training
    sharded: bool = False  # trains over several workers (FSDP2 / DDP, resources.workers > 1)
    knobs: tuple[str, ...] = ()

    @property
    def uses_bases(self) -> bool:
        """Whether training needs the pretrained singular bases (the penalized methods)."""
        return self.uses_lambda

    @property
    def sweeps_k(self) -> bool:
        """Whether the sweep's k values (and shared bases at those k) apply to this method."""
        return self.uses_k and self.uses_bases

    def effective_k(self, k: int | float) -> int | float:
        """The rank the penalty uses: full (1.0) for a full-rank penalty, 0 for a method without bases."""
        if self.full_rank:
            return 1.0
        return k if self.uses_bases else 0

    def logged_knobs(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (knob name -> value) restricted to the knobs this method reads."""
        return {name: values.get(name) for name in self.knobs}


_PENALTY_KNOBS = ("lambda", "period")
_LORA_KNOBS = ("lora_r", "lora_alpha")

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("sft", "plain supervised fine-tuning", "all", "none", sharded=True),
        MethodSpec(
            "rpsft",
            "SFT with the top-k block of each selected matrix anchored to the pretrained weights",
            "all",
            "lambda * ||Uk^T (W - W0) Vk||_F^2, rank k",
            uses_k=True,
            uses_lambda=True,
            sharded=True,
            knobs=("k", *_PENALTY_KNOBS, "penalty_mode", "basis_method"),
        ),
        MethodSpec(
            "l2-init",
            "SFT with an L2 pull of the selected matrices to the pretrained weights",
            "all",
            "lambda * ||W - W0||_F^2 (full rank)",
            uses_lambda=True,
            full_rank=True,
            sharded=True,
            knobs=(*_PENALTY_KNOBS, "penalty_mode"),
        ),
        MethodSpec(
            "dft",
            "dynamic fine-tuning (token loss scaled by its detached probability)",
            "all",
            "none",
            loss="dft",
            sharded=True,
        ),
        MethodSpec(
            "iw",
            "importance-weighted SFT against the frozen base model",
            "all",
            "none",
            loss="iw",
            reference_model=True,
            knobs=("iw_tau", "iw_clamp"),
        ),
        MethodSpec(
            "lora",
            "LoRA adapters on the selected matrices",
            "PEFT LoRA adapters",
            "none",
            adapter="lora",
            sharded=True,
            knobs=_LORA_KNOBS,
        ),
        MethodSpec(
            "rpsft-lora",
            "LoRA adapters with the RPSFT penalty on the merged weight W0 + s B A",
            "PEFT LoRA adapters",
            "lambda * ||Uk^T (s B A) Vk||_F^2, rank k",
            adapter="lora",
            uses_k=True,
            uses_lambda=True,
            sharded=True,
            knobs=("k", *_PENALTY_KNOBS, "basis_method", *_LORA_KNOBS),
        ),
        MethodSpec(
            "osf",
            "orthogonal subspace fine-tuning (PEFT OSF: the top-k subspace frozen)",
            "PEFT OSF adapters",
            "hard constraint (no penalty)",
            adapter="osf",
            uses_k=True,
            knobs=("k",),
        ),
    )
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # pydantic validates against the table's names


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``, or a ValueError that lists the methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}. Fix: one of {', '.join(METHOD_NAMES)}") from None


LOSS_DESCRIPTIONS: dict[str, str] = {
    "sft": "token NLL on the response",
    "dft": 'NLL x detached token probability (as TRL\'s `loss_type="dft"`)',
    "iw": "per-sequence weight `min(exp(tau * mean_t(logp - logp_ref)), clamp)` x NLL",
}


def methods_markdown() -> str:
    """The README's method table, generated from :data:`METHODS` (``rpsft methods`` prints it)."""
    rows = [
        "| method | what it is | parameters trained | penalty | loss | knobs |",
        "|---|---|---|---|---|---|",
    ]
    for spec in METHODS.values():
        knobs = ", ".join(f"`{k}`" for k in spec.knobs) or "-"
        cells = [
            f"`{spec.name}`",
            spec.summary,
            spec.trains,
            spec.penalty,
            LOSS_DESCRIPTIONS[spec.loss],
            knobs,
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)

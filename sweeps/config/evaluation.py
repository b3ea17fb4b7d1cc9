"""How a sweep's trials are scored (``evaluation:``): the loss-based trade-off, multiple choice, the
harness, intervals, the item split, intermediate evaluations and trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic_core import InitErrorDetails
from rpsft.evaluation.loss_metrics import LossSettings
from rpsft.evaluation.multiple_choice import MCSettings
from rpsft.evaluation.settings import EvalSettings


class Intervals(BaseModel):
    """Paired bootstrap intervals of G_id, F_ood and Phi (see :mod:`rpsft.evaluation.intervals`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    draws: int = Field(2000, ge=100)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class ItemSplitSettings(BaseModel):
    """The split of the scored items into the part the operating point is chosen on and the part it is reported
    on (see :mod:`rpsft.evaluation.item_split`); ``report_fraction: 0`` chooses and reports on the same items."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    report_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="share of each benchmark's items held out from the choice to report the operating point on "
        "(0: no split, choose and report on all items, biased upwards)",
    )
    seed: int = Field(0, ge=0, description="seed of the per-benchmark permutation of the items")

    def item_split(self) -> Any:
        from rpsft.evaluation.item_split import ItemSplit

        return ItemSplit(self.report_fraction, self.seed)


# evaluation.loss of a sweep: cheaper than `rpsft eval --loss` (LossSettings' own defaults), since every trial
# is scored with it
SWEEP_LOSS_DEFAULTS: dict[str, Any] = {
    "n_id": 8,
    "n_ood": 8,
    "max_new_tokens": 64,
    "max_length": 512,
    "kl": False,
}
# LossSettings fields a sweep sets itself: evaluation.data_dir / evaluation.subset, and the sweep's cache
SECTION_LOSS_FIELDS = ("data_dir", "subset", "cache_dir")
# EvalSettings fields a sweep sets itself (objective.betas, the sweep's cache)
SWEEP_HARNESS_FIELDS = ("betas", "cache_dir")


def _sweep_loss_fields(value: Any) -> Any:
    """The given ``evaluation.loss`` fields over :data:`SWEEP_LOSS_DEFAULTS`, for pydantic to validate."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return value  # a LossSettings is kept; pydantic names anything else
    own = [key for key in SECTION_LOSS_FIELDS if key in value]
    if own:
        raise ValueError(
            f"{', '.join(own)} cannot be set for the loss metrics alone. Fix: evaluation.data_dir / "
            "evaluation.subset (cache_dir: the sweep's top-level cache_dir)"
        )
    # id_benchmarks / ood_benchmarks: null means the default benchmarks
    given = {k: v for k, v in value.items() if not (k in ("id_benchmarks", "ood_benchmarks") and v is None)}
    return {**SWEEP_LOSS_DEFAULTS, **given}


def sweep_loss_settings(fields: dict[str, Any] | None = None) -> LossSettings:
    """``evaluation.loss`` as :class:`LossSettings`: the given fields over :data:`SWEEP_LOSS_DEFAULTS`."""
    return LossSettings.model_validate(_sweep_loss_fields(fields))


class EvaluationConfig(BaseModel):
    """How trials are scored. ``every`` > 0 adds intermediate loss evaluations (the rungs of ASHA).

    ``loss``, ``mc`` and ``harness`` are the evaluation's own settings (:class:`LossSettings`,
    :class:`MCSettings`, :class:`EvalSettings`); ``data_dir`` and ``subset`` of this section apply to all of
    them (the harness may set its own). :meth:`loss_settings`, :meth:`mc_settings` and
    :meth:`harness_settings` give the settings a trial is scored with.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data_dir: str = "../shared/paper-data"
    subset: Literal["full", "test"] = "full"
    loss: LossSettings = Field(
        default_factory=sweep_loss_settings,
        description="loss-based trade-off (rpsft.evaluation.loss_metrics): forward passes, cheap, moves on small "
        "models; unset fields take SWEEP_LOSS_DEFAULTS; ood_benchmarks: [] turns the OOD NLL/KL off (no base "
        "generations); data_dir and subset come from this section",
    )
    mc: MCSettings | None = Field(
        None,
        description="log-likelihood multiple-choice scoring of OOD items (needed by objective.metric: mc); "
        "data_dir and subset come from this section",
    )
    intervals: Intervals = Field(default_factory=Intervals)
    split: ItemSplitSettings = Field(default_factory=ItemSplitSettings)
    harness: EvalSettings | None = Field(
        None,
        description="lm-eval settings (as `rpsft eval`) scored at the end of each trial; data_dir and subset "
        "default to this section's, betas are objective.betas",
    )
    every: int = Field(0, ge=0, description="intermediate evaluation every N optimizer steps (0: at the end)")
    trajectory: bool = Field(
        False,
        description="each trial's intermediate evaluations (evaluation.every) become points of the trade-off "
        "too: trial@step, from the eval/ metrics and the per-item scores stored at that step "
        "(trajectory/step-<step>.json); `rpsft export --trial <id>@<step>` retrains one up to that step",
    )
    auto_k_prompts: str | None = Field(
        None, description="OOD prompts for k: auto (JSONL); default <data_dir>/ood/gpqa_test.jsonl"
    )
    rotation: bool = Field(
        False,
        description="log each trial's rotation (mean principal angle of the top-K left singular subspaces "
        "against the base, per layer and type) to MLflow; costs one SVD per matrix per trial",
    )
    rotation_top_k: int = Field(
        512, ge=1, description="K of the rotation diagnostic (min(K, m, n) per matrix)"
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> Any:
        return _sweep_loss_fields(value)

    @field_validator("harness", mode="before")
    @classmethod
    def _harness(cls, value: Any) -> Any:
        """The harness scores at objective.betas and caches under the sweep's cache_dir: its own ``betas`` and
        ``cache_dir`` are unknown keys here, refused like any other."""
        if isinstance(value, dict):
            unknown = [key for key in SWEEP_HARNESS_FIELDS if key in value]
            if unknown:
                raise ValidationError.from_exception_data(
                    "EvalSettings",
                    [InitErrorDetails(type="extra_forbidden", loc=(key,), input=value[key]) for key in unknown],
                )
        return value

    @field_serializer("loss")
    def _dump_loss(self, value: LossSettings, info: SerializationInfo) -> dict[str, Any]:
        return value.model_dump(mode=info.mode, exclude=set(SECTION_LOSS_FIELDS))

    @field_serializer("harness")
    def _dump_harness(self, value: EvalSettings | None, info: SerializationInfo) -> dict[str, Any] | None:
        # the fields given, so that data_dir / subset left out keep following this section's
        return None if value is None else value.model_dump(mode=info.mode, exclude_unset=True)

    def auto_k_source(self) -> str:
        return self.auto_k_prompts or str(Path(self.data_dir) / "ood" / "gpqa_test.jsonl")

    def loss_settings(self, cache_dir: str | None = None) -> LossSettings:
        """The loss metrics' settings: ``loss`` reading this section's data."""
        return self.loss.model_copy(
            update={"data_dir": self.data_dir, "subset": self.subset, "cache_dir": cache_dir}
        )

    def mc_settings(self) -> MCSettings | None:
        """The multiple-choice settings: ``mc`` reading this section's data (``None`` without ``mc``)."""
        if self.mc is None:
            return None
        return self.mc.model_copy(update={"data_dir": self.data_dir, "subset": self.subset})

    def harness_settings(self, betas: list[float], cache_dir: str | None = None) -> EvalSettings | None:
        """The lm-eval settings: ``harness`` with this section's data unless it names its own, the objective's
        betas and the sweep's cache (``None`` without ``harness``)."""
        if self.harness is None:
            return None
        update: dict[str, Any] = {"betas": list(betas), "cache_dir": cache_dir}
        for key in ("data_dir", "subset"):
            if key not in self.harness.model_fields_set:
                update[key] = getattr(self, key)
        return self.harness.model_copy(update=update)

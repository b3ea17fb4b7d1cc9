"""The RL stage: DAPO from a sweep's checkpoints with TRL's ``GRPOTrainer`` (``rpsft rl``).

    rpsft rl --from demo --trials op,sft            # kept (or exported) checkpoints of the sweep "demo"
    rpsft rl --model path/to/checkpoint --from demo # any checkpoint, scored by that sweep's evaluation
    rpsft rl --model path/to/checkpoint             # no sweep: RL with reward tracking only

DAPO as the paper's release runs it: the ``dapo`` loss (token-mean aggregation), asymmetric clipping
(``epsilon`` 0.2 / ``epsilon_high`` 0.28), no KL term (``beta`` 0) and no RPSFT penalty (unless ``penalty:`` is
set: beyond the paper, the penalty of the SFT checkpoint's own bases), truncated completions masked out of
the loss, and two rewards: the evaluation's boxed-answer equivalence (:mod:`rpsft.evaluation.rewards`) and TRL's
soft overlong punishment. Generation uses vLLM when it is installed and a GPU is present; it is never
required.

Tracking: each RL run is an MLflow child run of the sweep (tags ``rpsft.role=rl``, ``rpsft.init_trial``).
Per step: the reward, the KL to the initial model (on that model's own greedy responses to a few fixed
prompts), the response length and the clip fraction. The sweep's loss-based evaluation (G_id and F_ood
against the base model) scores the initial model, every ``eval_every`` steps and the final one; as in the
paper, the RL checkpoint kept is the one with the best ID score (``rl/chosen/*``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rpsft.core.config import format_validation_error
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import read_yaml_mapping
from rpsft.sweeps.store import tracking
from transformers import TrainerCallback

ROLE_RL = "rl"
TAG_INIT_TRIAL = "rpsft.init_trial"
TAG_RL_KEY = "rpsft.rl_key"
RL_STEP_KEYS = {  # TRL's log key -> the RL run's metric
    "reward": "rl/reward",
    "reward_std": "rl/reward_std",
    "rewards/boxed_answer/mean": "rl/reward_answer",
    "rewards/soft_overlong_punishment_reward/mean": "rl/reward_overlong",
    "kl_to_init": "rl/kl_to_init",
    "completions/mean_length": "rl/response_length",
    "completions/clipped_ratio": "rl/truncated_fraction",
    "clip_ratio/region_mean": "rl/clip_fraction",
    "clip_ratio/low_mean": "rl/clip_fraction_low",
    "clip_ratio/high_mean": "rl/clip_fraction_high",
    "entropy": "rl/entropy",
    "loss": "rl/loss",
    "grad_norm": "rl/grad_norm",
    "rpsft/penalty": "rl/penalty",  # with rl.penalty
    "rpsft/drift_mean": "rl/drift_mean",
}


class RLPenalty(BaseModel):
    """The RPSFT penalty kept during RL, with the bases of the SFT checkpoint itself (beyond the paper)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    k: int | float = Field(32, description="protected rank: an int, or a fraction of each matrix's rank")
    lam: float = Field(100.0, gt=0, alias="lambda")
    layers: str = "all"


class RLSettings(BaseModel):
    """One DAPO run (``rpsft rl --config rl.yaml``; every field has the paper's value or a CPU-sized one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str = Field(
        "champ:train",
        description="prompts with final answers: champ[:split[:N]] (offline), hf:BytedTsinghua-SIA/DAPO-Math-17k, "
        "or a JSONL file (rpsft.evaluation.rl_prompts.py)",
    )
    limit: int | None = Field(None, ge=1, description="use at most this many prompts")
    max_steps: int = Field(100, ge=1, description="optimizer steps (the paper: 100)")
    learning_rate: float = Field(1e-6, gt=0)
    prompts_per_step: int = Field(256, ge=1, description="prompts per optimizer step (the paper: 256)")
    num_generations: int = Field(8, ge=2, description="responses per prompt, the group of GRPO/DAPO (8)")
    micro_batch: int = Field(8, ge=1, description="completions per forward/backward pass and device")
    max_completion_length: int = Field(1024, ge=1)
    temperature: float = Field(1.0, gt=0)
    epsilon: float = Field(0.2, gt=0, description="lower clip ratio")
    epsilon_high: float = Field(0.28, gt=0, description="upper clip ratio (DAPO's clip-higher)")
    overlong_buffer: int = Field(256, ge=0, description="soft overlong punishment window (the paper: 2048)")
    overlong_penalty: float = Field(1.0, ge=0, description="weight of the overlong punishment")
    mask_truncated_completions: bool = True
    eval_every: int = Field(0, ge=0, description="score every N steps (0: the initial and final models only)")
    kl_probe: int = Field(4, ge=0, description="prompts of the KL-to-init probe (0: off; holds a 2nd model)")
    penalty: RLPenalty | None = None
    vllm: bool = Field(True, description="generate with vLLM when it is installed and a GPU is present")
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights (bfloat16 for 7-8B models on GPUs)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RLSettings:
        if self.overlong_buffer >= self.max_completion_length:
            raise ValueError(
                f"overlong_buffer ({self.overlong_buffer}) must be below max_completion_length "
                f"({self.max_completion_length}). Fix: a smaller buffer, e.g. {self.max_completion_length // 4}"
            )
        if self.epsilon_high < self.epsilon:
            raise ValueError(
                f"epsilon_high ({self.epsilon_high}) < epsilon ({self.epsilon}). Fix: epsilon_high >= epsilon"
            )
        return self

    def grad_accum(self, world_size: int = 1) -> int:
        completions = self.prompts_per_step * self.num_generations
        per_pass = self.micro_batch * world_size
        if completions % per_pass:
            raise SweepConfigError(
                f"rl.prompts_per_step: {self.prompts_per_step} prompts x {self.num_generations} generations = "
                f"{completions} completions per step is not a multiple of micro_batch x devices = {per_pass}. "
                "Fix: a micro_batch that divides it"
            )
        if self.micro_batch % self.num_generations and self.num_generations % self.micro_batch:
            raise SweepConfigError(
                f"rl.micro_batch: {self.micro_batch} and num_generations {self.num_generations}: one must divide "
                "the other, so that each generation batch holds whole groups"
            )
        return completions // per_pass

    def key(self) -> str:
        return hashlib.sha256(
            json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
        ).hexdigest()[:16]


def load_rl_settings(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RLSettings:
    raw = read_yaml_mapping(path, "config", "RL YAML") if path else {}
    raw = raw.get("rl", raw)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return RLSettings.model_validate(raw)
    except ValidationError as exc:
        raise SweepConfigError(
            format_validation_error(exc, str(path or "rpsft rl"), "RL configuration")
        ) from None


# ----------------------------------------------------------------------------------------------- callbacks


class KLToInit(TrainerCallback):
    """Adds ``kl_to_init`` to each log: mean per-token KL(init || policy) over the initial model's own greedy
    responses to a few fixed prompts (the measure of the OOD KL, pointed at the RL start)."""

    def __init__(self, init_model: Any, tokenizer: Any, conversations: list[Any], max_length: int) -> None:
        self.init_model, self.tokenizer, self.conversations, self.max_length = (
            init_model,
            tokenizer,
            conversations,
            max_length,
        )

    def value(self, model: Any) -> float:
        import torch
        from rpsft.core.models import full_precision_forward
        from rpsft.evaluation.loss_metrics import token_kl

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), full_precision_forward(model):
                pairs = token_kl(
                    self.init_model, model, self.tokenizer, self.conversations, max_length=self.max_length
                )
        finally:
            model.train(was_training)
        tokens = sum(n for _, n in pairs)
        return sum(s for s, _ in pairs) / tokens if tokens else 0.0

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and "reward" in logs and model is not None:
            logs["kl_to_init"] = self.value(model)


class RLProgress(TrainerCallback):
    """One line per step: the reward, its answer part, the KL to init and the response length."""

    def __init__(self, echo) -> None:
        self.echo = echo

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            parts = [f"reward {logs['reward']:+.3f}"]
            if "rewards/boxed_answer/mean" in logs:
                parts.append(f"correct {logs['rewards/boxed_answer/mean']:.3f}")
            if "kl_to_init" in logs:
                parts.append(f"KL to init {logs['kl_to_init']:.4f}")
            if "completions/mean_length" in logs:
                parts.append(f"length {logs['completions/mean_length']:.0f}")
            self.echo(f"[rpsft] rl step {state.global_step}/{state.max_steps}: " + ", ".join(parts))


class RLEvaluation(TrainerCallback):
    """The sweep's loss-based scores every ``every`` steps and at the end; the best-ID checkpoint so far is
    saved to ``chosen_dir`` (the paper picks the RL checkpoint by its ID score)."""

    def __init__(self, score, every: int, chosen_dir: Path, tokenizer: Any) -> None:
        self.score, self.every, self.chosen_dir, self.tokenizer = score, every, chosen_dir, tokenizer
        self.history: list[dict[str, float]] = []  # {"step", "g_id", "f_ood", ...}

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        from rpsft.core.models import full_precision_forward

        was_training = model.training
        model.eval()
        try:
            with full_precision_forward(model):  # as the initial model and the base are scored
                scores = {"step": step, **self.score(model)}
        finally:
            model.train(was_training)
        self.history.append(scores)
        trained = [h for h in self.history if h["step"] > 0]
        if step > 0 and max(trained, key=lambda h: (h["g_id"], h["step"])) is scores:
            shutil.rmtree(self.chosen_dir, ignore_errors=True)
            model.save_pretrained(self.chosen_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(self.chosen_dir)
        return scores

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (self.every and step % self.every == 0) or step >= state.max_steps:
            self.evaluate(model, step)

    def chosen(self) -> dict[str, float] | None:
        trained = [h for h in self.history if h["step"] > 0]
        return max(trained, key=lambda h: (h["g_id"], h["step"])) if trained else None


# ----------------------------------------------------------------------------------------------- trainer


def grpo_arguments(
    settings: RLSettings, output_dir: Path, world_size: int = 1, progress: bool = False
) -> Any:
    import torch
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    return GRPOConfig(
        output_dir=str(output_dir),
        loss_type="dapo",
        beta=0.0,
        epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high,
        num_generations=settings.num_generations,
        per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=settings.grad_accum(world_size),
        max_completion_length=settings.max_completion_length,
        mask_truncated_completions=settings.mask_truncated_completions,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_steps=settings.max_steps,
        reward_weights=[1.0, settings.overlong_penalty],
        use_vllm=bool(settings.vllm and cuda and importlib.util.find_spec("vllm")),
        vllm_mode="colocate",
        **({"gradient_checkpointing": True} if settings.gradient_checkpointing else {}),
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=not progress,
    )


def grpo_trainer(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    settings: RLSettings,
    output_dir: Path,
    callbacks: list[Any] = (),
    progress: bool = False,
) -> Any:
    """TRL's ``GRPOTrainer`` set up for DAPO on ``prompts`` (rows ``{"prompt": messages or text, "answer"}``)."""
    from datasets import Dataset
    from rpsft.evaluation.rewards import BoxedAnswerReward, overlong_penalty
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    callbacks = list(callbacks)
    if settings.penalty is not None:  # first, so the loggers see its penalty and drift
        callbacks.insert(0, _penalty_callback(model, settings.penalty))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[
            BoxedAnswerReward(),
            overlong_penalty(settings.max_completion_length, settings.overlong_buffer),
        ],
        args=grpo_arguments(settings, output_dir, progress=progress),
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _penalty_callback(model: Any, penalty: RLPenalty) -> Any:
    """The RPSFT penalty (:class:`rpsft.core.trainer.RPSFTCallback`) with bases of ``model`` itself."""
    import torch
    from rpsft.core.bases import compute_bases
    from rpsft.core.regularizer import RPSFTRegularizer
    from rpsft.core.selection import select_matrices
    from rpsft.core.trainer import RPSFTCallback

    selection = select_matrices(model, penalty.layers)
    with torch.no_grad():
        bases = compute_bases(selection, penalty.k)
    bases.bind(selection)
    return RPSFTCallback(RPSFTRegularizer(bases, penalty.lam))


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class RLOutcome:
    init: str  # the init trial's id, or the checkpoint path
    label: str
    run_id: str
    chosen_dir: Path | None
    init_scores: dict[str, float] | None
    chosen_scores: dict[str, float] | None
    final_scores: dict[str, float] | None
    rewards: list[float] = field(default_factory=list)


def _scores(scorer: Any, tokenizer: Any, betas: list[float]):
    def score(model: Any) -> dict[str, float]:
        import torch

        with torch.no_grad():
            metrics = scorer.loss_metrics(model, tokenizer)
        out = {"g_id": metrics["nll/g_id"], "f_ood": metrics["nll/f_ood"]}
        out.update({f"phi@{b:g}": metrics[f"nll/phi@{b:g}"] for b in betas if f"nll/phi@{b:g}" in metrics})
        return out

    return score


def _probe(settings: RLSettings, model: Any, tokenizer: Any, prompts: list[dict[str, Any]]) -> list[Any]:
    from rpsft.evaluation.loss_metrics import greedy_responses

    chosen = [p["prompt"] for p in prompts[: settings.kl_probe]]
    responses = greedy_responses(
        model, tokenizer, chosen, max_new_tokens=min(64, settings.max_completion_length)
    )
    return [[*p, {"role": "assistant", "content": r or "."}] for p, r in zip(chosen, responses)]


def run_rl_once(
    settings: RLSettings,
    init_dir: Path,
    work_dir: Path,
    *,
    client: Any,
    run_id: str,
    scorer: Any = None,
    betas: list[float] = (1.0,),
    progress: bool = True,
    echo=print,
) -> tuple[dict[str, Any], RLEvaluation | None, list[float]]:
    """DAPO from the checkpoint in ``init_dir``, tracked in ``run_id``. Returns ``(summary metrics, the
    evaluation record or None without a scorer, the per-step rewards)``."""
    import copy

    import torch
    from rpsft.core.models import load_model
    from rpsft.evaluation.rl_prompts import load_rl_prompts
    from rpsft.sweeps.trial.training import MlflowStepLogger

    torch.manual_seed(settings.seed)
    prompts = load_rl_prompts(settings.data, settings.limit)
    model, tokenizer = load_model(str(init_dir), dtype=settings.dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    callbacks: list[Any] = []
    if settings.kl_probe:
        init_model = copy.deepcopy(model).eval().requires_grad_(False)
        callbacks.append(
            KLToInit(init_model, tokenizer, _probe(settings, init_model, tokenizer, prompts), max_length=1024)
        )
    callbacks.append(MlflowStepLogger(client, run_id, keys=RL_STEP_KEYS))
    evaluation = None
    if scorer is not None:
        evaluation = RLEvaluation(
            _scores(scorer, tokenizer, list(betas)), settings.eval_every, work_dir / "chosen", tokenizer
        )
        init_scores = evaluation.evaluate(model, 0)
        tracking.log_metrics(
            client, run_id, {f"rl/{k}": v for k, v in init_scores.items() if k != "step"}, step=0
        )
        echo(f"[rpsft] rl: initial model G_id {init_scores['g_id']:+.4f}  F_ood {init_scores['f_ood']:+.4f}")
        callbacks.append(_EvaluationLogger(client, run_id, evaluation))
        callbacks.insert(0, evaluation)
    if progress:
        callbacks.append(RLProgress(echo))
    trainer = grpo_trainer(model, tokenizer, prompts, settings, work_dir / "trainer", callbacks)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    summary: dict[str, Any] = {"rl/steps": trainer.state.global_step}
    if rewards:
        summary["rl/reward_first"], summary["rl/reward_last"] = rewards[0], rewards[-1]
    if evaluation is None:  # no scores: the final model is the RL checkpoint
        chosen_dir = work_dir / "chosen"
        shutil.rmtree(chosen_dir, ignore_errors=True)
        trainer.model.save_pretrained(chosen_dir, safe_serialization=True)
        tokenizer.save_pretrained(chosen_dir)
    else:
        init_scores, final, chosen = evaluation.history[0], evaluation.history[-1], evaluation.chosen()
        for name, scores in (("init", init_scores), ("final", final), ("chosen", chosen)):
            summary.update({f"rl/{name}/{k}": v for k, v in scores.items() if k != "step"})
        summary["rl/chosen_step"] = chosen["step"]
    return summary, evaluation, rewards


class _EvaluationLogger(TrainerCallback):
    """The RL evaluation's scores into the run, at their step (after :class:`RLEvaluation` made them)."""

    def __init__(self, client: Any, run_id: str, evaluation: RLEvaluation) -> None:
        self.client, self.run_id, self.evaluation, self.logged = client, run_id, evaluation, 1

    def on_step_end(self, args, state, control, **kwargs):
        for scores in self.evaluation.history[self.logged :]:
            values = {f"rl/{k}": v for k, v in scores.items() if k != "step"}
            tracking.log_metrics(self.client, self.run_id, values, step=int(scores["step"]))
        self.logged = len(self.evaluation.history)


def _rl_run(
    client: Any, experiment_id: str, parent: str | None, name: str, tags: dict[str, str], key: str
) -> Any:
    query = f"tags.`{TAG_RL_KEY}` = '{key}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=5)
    for run in found:
        if run.info.status == "FINISHED":
            return run
    all_tags = {TAG_RL_KEY: key, tracking.TAG_ROLE: ROLE_RL, "mlflow.runName": name, **tags}
    if parent:
        all_tags[tracking.PARENT_TAG] = parent
    return client.create_run(experiment_id, run_name=name, tags=all_tags)


def _outcome_from_run(client: Any, run: Any, init: str, label: str, chosen_dir: Path | None) -> RLOutcome:
    metrics = run.data.metrics

    def scores(prefix: str) -> dict[str, float] | None:
        out = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        return out or None

    chosen = scores("rl/chosen/")
    if chosen is not None and "rl/chosen_step" in metrics:
        chosen["step"] = metrics["rl/chosen_step"]
    rewards = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "rl/reward"), key=lambda m: m.step)
    ]
    return RLOutcome(
        init, label, run.info.run_id, chosen_dir, scores("rl/init/"), chosen, scores("rl/final/"), rewards
    )


def run_rl(
    settings: RLSettings,
    *,
    sweep: str | None = None,
    trials: list[str] | None = None,
    model: str | None = None,
    root: str | Path = "runs/sweeps",
    tracking_uri: str | None = None,
    progress: bool = True,
    echo=print,
) -> list[RLOutcome]:
    """DAPO from each named trial of ``sweep`` (kept or exported checkpoints), or from ``model``. With a sweep,
    runs are MLflow children of its parent run and scored by its evaluation; a run already finished with the
    same settings and init is reported, not repeated."""
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.stages.checkpoints import local_checkpoint

    if sweep is None and model is None:
        raise SweepConfigError(
            "rl: nothing to start from. Fix: --from SWEEP [--trials op,sft], or --model PATH"
        )
    stored = load_stored_sweep(sweep, root) if sweep else None
    inits: list[tuple[str, str, Path, dict[str, str]]] = []  # (init id, label, checkpoint, tags)
    if model is not None:
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SweepConfigError(
                f"--model: {path} holds no HF checkpoint (config.json). Fix: a checkpoint directory"
            )
        inits.append((str(path), path.name, path, {TAG_INIT_TRIAL: str(path)}))
    if stored is not None and model is None:
        for selector in trials or ["op"]:
            trial, path = local_checkpoint(stored, selector, stored.store.rl_inits_dir)
            label = trial.tags.get("mlflow.runName", trial.trial_id)
            inits.append(
                (
                    trial.trial_id,
                    label,
                    path,
                    {TAG_INIT_TRIAL: trial.trial_id, "rpsft.init_run": trial.run_id},
                )
            )
    if stored is not None:
        uri, experiment_id, parent = (
            stored.context.tracking_uri,
            stored.context.experiment_id,
            stored.context.parent_run_id,
        )
        base_dir = stored.store.rl_dir
        sweep_tags = {tracking.TAG_SWEEP: stored.config.name}
    else:
        uri = tracking_uri or f"sqlite:///{Path('runs/rl/mlflow.db').resolve()}"
        Path("runs/rl").mkdir(parents=True, exist_ok=True)
        client0 = tracking.client_for(uri)
        experiment_id, parent = tracking.ensure_experiment(client0, "rpsft-rl"), None
        base_dir, sweep_tags = Path("runs/rl").resolve(), {}
    client = tracking.client_for(uri)
    scorer = None
    if stored is not None:
        from rpsft.sweeps.trial.scoring import TrialScorer

        scorer = TrialScorer(stored.config, stored.context.base_key, stored.context.cache_dir)
    outcomes = []
    for init, label, path, tags in inits:
        origin = stored.config.name if stored is not None else ""
        key = hashlib.sha256(f"{origin}|{init}|{settings.key()}".encode()).hexdigest()[:16]
        work_dir = base_dir / key
        run = _rl_run(client, experiment_id, parent, f"rl from {label}", {**sweep_tags, **tags}, key)
        if run.info.status == "FINISHED":
            echo(f"[rpsft] rl from {label}: finished before (run {run.info.run_id}); not repeated")
            outcomes.append(_outcome_from_run(client, run, init, label, work_dir / "chosen"))
            continue
        run_id = run.info.run_id
        tracking.log_params(client, run_id, {**settings.model_dump(mode="json", by_alias=True), "init": init})
        echo(f"[rpsft] rl from {label}: {settings.max_steps} DAPO steps, MLflow run {run_id}")
        try:
            summary, evaluation, _ = run_rl_once(
                settings,
                path,
                work_dir,
                client=client,
                run_id=run_id,
                scorer=scorer,
                betas=stored.config.objective.betas if stored else [1.0],
                progress=progress,
                echo=echo,
            )
            tracking.log_metrics(client, run_id, summary, step=settings.max_steps)
            if evaluation is not None:
                tracking.log_json_artifact(client, run_id, "rl_evaluations.json", evaluation.history)
            tracking.finish_run(client, run_id, "FINISHED", state="finished")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                tracking.record_failure(client, run_id, exc)
                tracking.finish_run(client, run_id, "FAILED", state="failed")
            raise
        outcomes.append(_outcome_from_run(client, client.get_run(run_id), init, label, work_dir / "chosen"))
    return outcomes

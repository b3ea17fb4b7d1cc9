"""What one evaluation of a sweep's trial costs, part by part, on the sweep's own model and items: the loss-based
trade-off (ID reference NLLs and OOD NLLs of the base model's answers), the multiple-choice view and the
rotation diagnostic, each timed on the base model as a stand-in for a trained one (the same shapes and items).

    python benchmarks/bench_eval_cost.py sweeps/configs/study-smollm2.yaml   # from the repository root

The base model's answers and scores are computed first (and cached, as a sweep caches them); they are not part
of a trial's cost and are timed apart. The table gives each part's seconds and share, and a trial's evaluation
cost: the final scoring plus one intermediate evaluation per ``evaluation.every`` steps (trajectory points also
score the multiple-choice view). Use it to size a study before running it: a trial costs its training steps
plus these evaluations.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def sweep_config(path: Path):
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import absolutize

    raw = yaml.safe_load(path.read_text())
    if "sweep" in raw:  # a study config: its sweep, inline
        raw = raw["sweep"]
    return absolutize(
        parse_sweep_config(raw)
    )  # relative paths: against the working directory, as a sweep reads them


def trial_steps(config) -> int:
    """A trial's optimizer steps: ``train.max_steps``, or the epochs over ``data_limit`` examples."""
    train = config.trial_train_config({"k": 1, "lambda": 1.0})
    if train.max_steps:
        return int(train.max_steps)
    per_step = train.batch_size * train.grad_accum
    return math.ceil(math.ceil(int(config.train["data_limit"]) / per_step) * train.epochs)


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="a sweep or study config")
    args = parser.parse_args()

    import torch
    from rpsft.core.models import default_cache_dir, load_model, load_tokenizer
    from rpsft.evaluation.scoring import name_fingerprint
    from rpsft.sweeps.trial.scoring import TrialScorer

    config = sweep_config(args.config)
    torch.set_num_threads(int(config.resources.cpus))
    cache = str(Path(config.cache_dir or default_cache_dir()) / "eval")
    scorer = TrialScorer(config, base_key=name_fingerprint(config.model), cache_dir=cache)
    dtype = config.trial_train_config({"k": 1, "lambda": 1.0}).dtype
    tokenizer = load_tokenizer(config.model, config.cache_dir)
    model, _ = load_model(config.model, dtype=dtype, cache_dir=config.cache_dir)
    model.eval()

    rows: list[tuple[str, float]] = []
    with torch.no_grad():
        base_s, _ = timed(lambda: scorer.warm_base(model, tokenizer))
        loss_s, loss = timed(lambda: scorer.loss_metrics(model, tokenizer))
        rows.append(("loss trade-off (nll)", loss_s))
        if scorer.mc_settings is not None:
            mc_s, _ = timed(lambda: scorer.mc_metrics(model, tokenizer, loss))
            rows.append(("multiple choice (mc)", mc_s))
    if config.evaluation.rotation:  # against the base subspaces the driver caches once per sweep
        from rpsft.evaluation.diagnostics.rotation import left_subspaces, rotation_summary

        top_k = config.evaluation.rotation_top_k
        with torch.no_grad():
            subspaces = left_subspaces(model, "all", top_k=top_k)
            rotation_s, _ = timed(
                lambda: rotation_summary(None, model, list(subspaces), top_k=top_k, base_subspaces=subspaces)
            )
        rows.append(("rotation diagnostic", rotation_s))

    parts = dict(rows)
    final = sum(parts.values())
    intermediate = parts["loss trade-off (nll)"]
    if config.evaluation.trajectory or config.objective.metric == "mc":
        intermediate += parts.get("multiple choice (mc)", 0.0)
    steps = trial_steps(config)
    every = config.evaluation.every
    n_intermediate = (steps - 1) // every if every else 0
    print(
        f"# one evaluation of a trial of {config.name} ({config.model}, {torch.get_num_threads()} threads)\n"
    )
    print("| part | seconds | share of the final scoring |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / final:.0%} |")
    print(f"| final scoring (all parts) | {final:.1f} | 100% |")
    print(f"| an intermediate evaluation | {intermediate:.1f} | {intermediate / final:.0%} |")
    print(f"\nbase model's answers and scores, once per sweep (cached): {base_s:.1f} s")
    total = final + n_intermediate * intermediate
    print(
        f"a trial of {steps} steps scores {n_intermediate} intermediate checkpoint(s): {total:.0f} s of evaluation"
    )


if __name__ == "__main__":
    main()

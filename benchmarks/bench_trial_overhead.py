"""The per-trial overhead of a sweep: one Ray worker reused by every trial against a new
worker per trial, on the same small sweep in one run.

    python benchmarks/bench_trial_overhead.py           # a tiny Llama, 5 trials, each way (~1.5 min on 2 cores)

A tiny model trains in well under a second, so what the sweep's time measures is what every trial pays apart
from training: a worker process, its imports, loading the model and the cached bases, MLflow. The script
prints both times, their ratio, and checks that every trial's G_id and F_ood are the same either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = REPO.parent / "shared" / "paper-data"


def tiny_sweep(root: Path, name: str, trials: int) -> dict:
    from rpsft.core.models import load_tokenizer, tiny_model

    model_dir = root / "tiny-llama"
    if not (model_dir / "config.json").exists():
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        tiny_model("llama", vocab_size=len(tokenizer), seed=0).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return {
        "name": name,
        "model": str(model_dir),
        "data": "demo-math:16",
        "output_dir": str(root / "sweeps"),
        "cache_dir": str(root / "cache"),
        "train": {"max_length": 96, "batch_size": 2, "max_steps": 2, "learning_rate": 5e-3},
        "space": {
            "k": [4, 0.25],
            "lambda": {"low": 0.1, "high": 10.0, "log": True},
            "layers": ["all", "attn"],
        },
        "references": ["sft", "l2-init"],
        "evaluation": {
            "data_dir": str(PAPER_DATA),
            "loss": {"n_id": 2, "n_ood": 2, "id_benchmarks": ["math500"], "ood_benchmarks": ["gpqa"]},
        },
        "search": {"num_trials": trials - 2, "seed": 0},
        "resources": {"cpus": 1},
    }


def timed_sweep(raw: dict, reuse: bool) -> tuple[float, dict[str, tuple[float, float]]]:
    """Seconds of the whole sweep and each trial's (G_id, F_ood); ``reuse=True`` keeps one worker for every trial
    (``reuse_workers``), ``False`` gives every trial a new one."""
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import run_sweep

    started = time.perf_counter()
    outcome = run_sweep(
        parse_sweep_config({**raw, "reuse_workers": reuse}), echo=lambda *a, **k: None, progress=False
    )
    seconds = time.perf_counter() - started
    return seconds, {t.label: (t.metrics["g_id"], t.metrics["f_ood"]) for t in outcome.trials if t.finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per sweep (2 references + searched)")
    args = parser.parse_args()
    if not PAPER_DATA.is_dir():
        sys.exit(f"bench_trial_overhead: the evaluation items are not at {PAPER_DATA}")
    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-trial-overhead-"))
    reused, fresh = {}, {}
    seconds = {}
    for reuse, store in ((True, reused), (False, fresh)):
        seconds[reuse], results = timed_sweep(tiny_sweep(root, f"reuse-{reuse}", args.trials), reuse)
        store.update(results)
        ray.shutdown()
    print(f"load_avg_1m {os.getloadavg()[0]:.2f}")
    print("| workers | trials | sweep (s) | per trial (s) |\n|---|---|---|---|")
    for reuse, label in ((False, "one per trial (the default)"), (True, "reused (reuse_workers: true)")):
        print(f"| {label} | {args.trials} | {seconds[reuse]:.1f} | {seconds[reuse] / args.trials:.1f} |")
    print(f"\nratio (one per trial / reused): {seconds[False] / seconds[True]:.2f}")
    same = reused == fresh
    print(f"every trial's G_id and F_ood identical either way: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""How many evaluation items a sweep needs: the width of the paired intervals against the item count.

Reads a finished sweep's stored per-item scores (nothing is retrained or rescored). For each item count n it
takes the first n items of every benchmark and reports the 95% paired bootstrap half-widths of G_id and F_ood
of the ``sft`` reference and of the difference ``Phi_best - Phi_sft`` (best: the max-Phi configuration other
than sft), beside the scoring cost of one trial at that n (measured: each run's wall time minus its training
time, divided by the items it scored). A difference between two trials is measurable at an n whose half-width
is below the difference.

    python benchmarks/bench_eval_noise.py study-smollm2 --runs-dir runs/sweeps --counts 4,8,12,16,24
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _first(items: dict, n: int) -> dict:
    return {suite: {b: rows[:n] for b, rows in benches.items()} for suite, benches in items.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep")
    parser.add_argument("--runs-dir", dest="runs_dir", default="runs/sweeps", help="The root of the stored sweeps.")
    parser.add_argument("--counts", default="4,8,12,16,24,32")
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from rpsft.evaluation.intervals import bootstrap_tradeoff
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.analysis.uncertainty import objective_items, read_base_item_scores, stored_item_scores

    stored = load_stored_sweep(args.sweep, args.runs_dir)
    config = stored.config
    beta = config.objective.beta if args.beta is None else args.beta
    metric = config.objective.metric
    client = stored.client
    base = objective_items(read_base_item_scores(config, client, stored.context.parent_run_id), metric)
    points = stored.points
    sft = next(p for p in points if p.params.get("method") == "sft")
    best = max((p for p in points if p.params.get("method") != "sft"), key=lambda p: p.phi(beta))
    scores = stored_item_scores(client, points)

    def seeds(point):
        return [objective_items(scores[r], metric) for r in (point.run_ids or (point.run_id,))]

    n_max = min(len(rows) for benches in base.values() for rows in benches.values())
    items_per_trial = sum(len(rows) for benches in base.values() for rows in benches.values())
    costs = []
    for trial in stored.trials:
        if trial.status == "FINISHED" and trial.wall_seconds is not None:
            costs.append((trial.wall_seconds - trial.metrics.get("train_seconds", 0.0)) / items_per_trial)
    per_item = sorted(costs)[len(costs) // 2] if costs else float("nan")
    n_bench = sum(len(b) for b in base.values())
    rows = []
    for n in [int(c) for c in args.counts.split(",")]:
        if n > n_max:
            continue
        draws = bootstrap_tradeoff(
            _first(base, n),
            {"sft": [_first(s, n) for s in seeds(sft)], "best": [_first(s, n) for s in seeds(best)]},
            draws=2000,
            seed=0,
        )
        g, f, d = draws.g_id("sft"), draws.f_ood("sft"), draws.phi_difference("best", "sft", beta)
        rows.append(
            {
                "n": n,
                "g_sft": g.estimate,
                "hw_g": (g.high - g.low) / 2,
                "f_sft": f.estimate,
                "hw_f": (f.high - f.low) / 2,
                "phi_best_minus_sft": d.estimate,
                "hw_diff": (d.high - d.low) / 2,
                "scoring_s_per_trial": per_item * n * n_bench,
            }
        )
    print(
        f"sweep {config.name} ({config.model}, objective {metric}, beta {beta:g}); best: {best.params.get('reference') or best.params}; "
        f"scoring cost {per_item:.2f} s per item (median over {len(costs)} runs, includes loading and rotation)"
    )
    print(f"{'n/bench':>8s} {'G_sft':>9s} {'+-':>7s} {'F_sft':>9s} {'+-':>7s} {'dPhi':>9s} {'+-':>7s} {'s/trial':>8s}")
    for r in rows:
        print(
            f"{r['n']:8d} {r['g_sft']:+9.4f} {r['hw_g']:7.4f} {r['f_sft']:+9.4f} {r['hw_f']:7.4f} "
            f"{r['phi_best_minus_sft']:+9.4f} {r['hw_diff']:7.4f} {r['scoring_s_per_trial']:8.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"sweep": config.name, "beta": beta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

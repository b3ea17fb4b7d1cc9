#!/usr/bin/env python
"""Benchmark the per-trial rotation diagnostic of sweeps (``evaluation: {rotation: true}``).

On the embedded SmolLM2-135M (real weights): the driver's one-time decomposition of the base
(``left_subspaces``), the size of its float32 cache, and a trial's ``rotation_summary`` of a perturbed copy
with the cached base subspaces against the same call decomposing the base itself (what caching saves).

    python benchmarks/bench_rotation.py                 # CPU, K = 512 (~2 min on a 2-core CPU)
    python benchmarks/bench_rotation.py --top-k 128 --json benchmarks/results/rotation.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, mib, resolve_device, table, timed, write_json  # noqa: E402
from rpsft.core.models import load_model  # noqa: E402
from rpsft.evaluation.diagnostics.rotation import left_subspaces, rotation_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--noise", type=float, default=1e-3, help="std of the perturbation standing for training"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    print("environment:", environment(device))

    base, _ = load_model(args.model)
    base.to(device).eval()
    with torch.no_grad():
        once, subspaces = timed(lambda: left_subspaces(base, "all", top_k=args.top_k), device)
        cache = {name: u.float() for name, u in subspaces.items()}
        cached = {name: u.double() for name, u in cache.items()}
        tuned = copy.deepcopy(base)
        generator = torch.Generator(device=device).manual_seed(0)
        for name, param in tuned.named_parameters():
            if name in cache:
                param.add_(torch.randn(param.shape, generator=generator, device=device) * args.noise)
        names = list(cache)
        with_cache, summary = timed(
            lambda: rotation_summary(None, tuned, names, top_k=args.top_k, base_subspaces=cached), device
        )
        without_cache, reference = timed(
            lambda: rotation_summary(base, tuned, names, top_k=args.top_k), device
        )

    cache_bytes = sum(u.numel() * u.element_size() for u in cache.values())
    rows = [
        {"step": "driver: base subspaces (once per sweep)", "seconds": once, "ratio": None},
        {
            "step": "trial: rotation with the cached base",
            "seconds": with_cache,
            "ratio": with_cache / without_cache,
        },
        {"step": "trial: rotation decomposing the base too", "seconds": without_cache, "ratio": 1.0},
    ]
    print(
        f"\n{args.model}: {len(cache)} non-trivial matrices at K = {args.top_k}, cache {mib(cache_bytes):.0f} MiB"
    )
    print(table(rows, [("step", "step"), ("seconds", "seconds"), ("ratio", "x uncached trial")]))
    gap = abs(summary["mean_deg"] - reference["mean_deg"])
    print(
        f"\nmean rotation {summary['mean_deg']:.5f} deg (cached) vs {reference['mean_deg']:.5f} deg: |diff| {gap:.1e}"
    )
    print("load_avg_1m at the end:", environment(device).get("load_avg_1m"))
    write_json(
        args.json,
        {
            "environment": environment(device),
            "rows": rows,
            "matrices": len(cache),
            "cache_mib": mib(cache_bytes),
            "mean_deg": [summary["mean_deg"], reference["mean_deg"]],
        },
    )


if __name__ == "__main__":
    main()

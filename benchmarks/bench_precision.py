"""One training step (forward + backward) of the embedded SmolLM2-135M-Instruct in float32 and under bf16
autocast, on this machine's CPU: the ratio says whether ``mixed_precision: bf16`` pays here (native bf16:
AMX / AVX512-BF16) or is emulated. ``mixed_precision: auto`` reads the same capability.

    .venv/bin/python benchmarks/bench_precision.py [--batch 4 --length 384 --repeats 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def step_seconds(model, batch: torch.Tensor, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return time.perf_counter() - started


def main() -> None:
    from rpsft.core.models import load_model
    from rpsft.core.precision import cpu_has_native_bf16, resolve_mixed_precision

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m-instruct")
    batch = torch.randint(0, 1000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    step_seconds(model, batch[:1, :32], False)  # warm-up
    times = {
        name: min(step_seconds(model, batch, name == "bf16") for _ in range(args.repeats))
        for name in ("float32", "bf16")
    }
    print(
        f"CPU native bf16: {cpu_has_native_bf16()}; mixed_precision: auto -> {resolve_mixed_precision('auto', 'cpu')}"
    )
    print(
        f"| precision | step (s), batch {args.batch} x {args.length}, {torch.get_num_threads()} threads | ratio |"
    )
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} | {seconds / times['float32']:.2f} |")


if __name__ == "__main__":
    main()

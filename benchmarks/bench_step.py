#!/usr/bin/env python
"""Benchmark one optimizer step of SFT vs RPSFT: time per step, overhead, peak memory.

Modes (same model, optimizer, data; interleaved in one process so the ratios share the machine's noise):

* ``sft``: ``grad_accum`` micro-batches of forward + backward (loss / grad_accum), clip, AdamW step.
* ``closed``: RPSFT closed form, the same + ``RPSFTRegularizer.add_grad_()`` once per optimizer step, after the
  backward passes and before clipping (the fast path of ``rpsft.core``).
* ``autograd``: RPSFT reference, ``(loss + regularizer.penalty()) / grad_accum`` on every micro-batch (the
  reference implementation's way: the penalty goes through autograd on each micro-batch).
* ``decoupled``: ``penalty_mode: decoupled``, SFT's step + ``RPSFTRegularizer.prox_step_(lr)`` once per
  optimizer step, after ``optimizer.step()`` (no penalty gradient).

Reported: median seconds per optimizer step (after warm-up), ratio to SFT, tokens per step, the cost of
``add_grad_()``, of ``prox_step_()`` and of ``penalty()`` forward + backward alone, and the peak memory of a step above its start
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS above the RSS at step start, read
from ``/proc/self/status`` VmHWM after resetting it, with glibc's mmap threshold at 128 KiB so freed tensors
leave the RSS), plus the persistent bytes of the bases.

    python benchmarks/bench_step.py                          # CPU: real SmolLM2-135M, k=64, 2x128 tokens x 4
    python benchmarks/bench_step.py --device cuda --shapes qwen2.5-3b --dtype bfloat16 \\
        --micro-batch 4 --seq-len 1024 --grad-accum 8       # the issue's target: 32k tokens per step
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    ARCHS,
    DEFAULT_K,
    arch_config,
    environment,
    median,
    mib,
    resolve_device,
    sync,
    table,
    timed,
    write_json,
)
from rpsft.core.bases import BASIS_METHODS, compute_bases  # noqa: E402
from rpsft.core.regularizer import RPSFTRegularizer  # noqa: E402
from rpsft.core.selection import select_matrices  # noqa: E402

MODES = {
    "sft": "SFT: fwd+bwd x grad_accum, clip, AdamW",
    "closed": "RPSFT closed form: + add_grad_() once per step",
    "autograd": "RPSFT autograd ref.: + penalty() every micro-batch",
    "decoupled": "RPSFT decoupled: + prox_step_(lr) once per step, after AdamW",
}

# ------------------------------------------------------------------------------------------ peak memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class PeakMemory:
    """Peak memory of a region above its start. CUDA: allocator stats. CPU: VmHWM - VmRSS (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        self.label = ""
        if device.type == "cuda":
            self.label = "torch.cuda.max_memory_allocated - memory_allocated at step start"
            return
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.label = "peak RSS above step start (VmHWM - VmRSS; glibc mmap threshold 128 KiB)"
        except OSError:
            self.label = "unavailable (needs Linux /proc/self/clear_refs and glibc)"
            self.libc = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self.libc is not None

    def exact_mode(self, on: bool) -> None:
        """CPU: a small fixed mmap threshold makes every freed tensor leave the RSS (slower; memory pass only)."""
        if self.libc is None:
            return
        threshold = 128 * 1024 if on else 32 * 1024 * 1024  # 32 MiB = glibc's dynamic maximum
        self.libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        self.libc.mallopt(_M_TRIM_THRESHOLD, threshold)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.libc is not None:
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._base = _proc_status()["VmRSS"]

    def stop(self) -> tuple[int | None, int | None]:
        """(peak above start, absolute peak) in bytes."""
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return peak - self._base, peak
        if self.libc is None:
            return None, None
        status = _proc_status()
        return status["VmHWM"] - self._base, status["VmHWM"]


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    return values


# ------------------------------------------------------------------------------------------------ model


def build_model(args, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.shapes == "smollm2" and not args.random_init:
        from rpsft.core.models import load_model

        model, _ = load_model("smollm2-135m-instruct", dtype=dtype, device=device)
        source = "real SmolLM2-135M-Instruct weights (load_model)"
        if args.layers is not None:
            raise SystemExit("--layers needs --random-init with --shapes smollm2")
    else:
        cfg = arch_config(args.shapes, layers=args.layers, vocab=args.vocab)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=args.attn)
        source = f"random init from {type(cfg).__name__} ({args.shapes} sizes)"
    model.config.use_cache = False
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model, source


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", choices=ARCHS, default="smollm2",
                   help="smollm2 = the real SmolLM2-135M (load_model); others: random init from the config")
    p.add_argument("--random-init", action="store_true", help="smollm2: random init from the config instead")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (random init only)")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size (random init only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (bases and optimizer follow it)")
    p.add_argument("--autocast", action="store_true", help="CUDA: bf16 autocast around forward (+ penalty)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation for random-init models")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--k", type=int, default=None, help="rank (default: 64 for smollm2, 768 otherwise)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--selection", default="all")
    p.add_argument("--basis-method", default="gram", choices=BASIS_METHODS,
                   help="how to compute the bases (the step cost does not depend on it)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm (0: off)")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="AdamW(fused=True) (default: on for CUDA)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--repeats", type=int, default=3, help="timed optimizer steps per mode (median)")
    p.add_argument("--overhead-repeats", type=int, default=5, help="timed add_grad_() / penalty() calls")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="one extra step per mode measuring peak memory (it doubles as that mode's warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="write all measurements to this JSON file")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = DEFAULT_K[args.shapes]
    if args.fused_adamw is None:
        args.fused_adamw = args.device == "cuda"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; use {', '.join(MODES)}")
    if "sft" not in args.modes:
        args.modes.insert(0, "sft")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    memory = PeakMemory(device)

    model, source = build_model(args, device)
    selection = select_matrices(model, args.selection)
    seconds_bases, bases = timed(lambda: compute_bases(selection, args.k, method=args.basis_method), device)
    regularizer = RPSFTRegularizer(bases, args.lam)
    decoupled = RPSFTRegularizer(bases, args.lam, mode="decoupled")  # the same bases, bound to the same weights
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=args.fused_adamw or None)

    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = [torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(device)
               for _ in range(args.grad_accum)]
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)

    def micro_loss(ids: torch.Tensor, with_penalty: bool) -> torch.Tensor:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
            if with_penalty:
                loss = loss + regularizer.penalty()
        return loss

    def step(mode: str) -> None:
        for ids in batches:
            (micro_loss(ids, mode == "autograd") / args.grad_accum).backward()
        if mode == "closed":
            regularizer.add_grad_()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        if mode == "decoupled":
            decoupled.prox_step_(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in params)
    env = environment(device)
    print(f"# bench_step: {args.shapes} ({source}), {n_params / 1e6:.1f}M params, dtype={args.dtype}"
          f"{' + bf16 autocast' if args.autocast else ''}, device={device}")
    print("# env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"# RPSFT: selection '{args.selection}' ({len(selection)} matrices), k={args.k}, lambda={args.lam}, "
          f"bases by '{args.basis_method}' in {seconds_bases:.1f} s, {mib(bases.nbytes()):.1f} MiB")
    print(f"# batch: {args.micro_batch} x {args.seq_len} tokens x grad_accum {args.grad_accum} = {tokens} tokens"
          f" per optimizer step; AdamW(fused={args.fused_adamw}), clip={args.clip}, "
          f"grad_checkpointing={args.grad_checkpointing}")
    print(f"# timing: median of {args.repeats} steps per mode, modes interleaved (rotated order), "
          f"after one warm-up step per mode\n", flush=True)

    # 1. first step ever (lazy inits, AdamW state allocation): not measured
    step("sft")
    # 2. one step per mode with peak memory (doubles as each mode's warm-up)
    peaks: dict[str, tuple[int | None, int | None]] = {}
    memory.exact_mode(args.memory)
    for mode in args.modes:
        memory.start()
        step(mode)
        peaks[mode] = memory.stop() if args.memory else (None, None)
    memory.exact_mode(False)
    # 3. timed steps, interleaved
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        order = args.modes[rep % len(args.modes):] + args.modes[: rep % len(args.modes)]
        for mode in order:
            seconds, _ = timed(lambda: step(mode), device)
            times[mode].append(seconds)
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in args.modes),
              file=sys.stderr, flush=True)

    # 4. the regularizer's own cost, with the gradients of one micro-batch present
    (micro_loss(batches[0], False) / args.grad_accum).backward()
    add_grad = [timed(regularizer.add_grad_, device)[0] for _ in range(args.overhead_repeats)]
    prox = [timed(lambda: decoupled.prox_step_(args.lr), device)[0] for _ in range(args.overhead_repeats)]
    penalty_fb = []
    for _ in range(args.overhead_repeats):
        def penalty_step():
            with autocast:
                value = regularizer.penalty()
            (value / args.grad_accum).backward()

        penalty_fb.append(timed(penalty_step, device)[0])
    optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------ report
    sft = median(times["sft"])
    rows = []
    for mode in args.modes:
        med = median(times[mode])
        delta, absolute = peaks[mode]
        rows.append({
            "mode": mode, "what": MODES[mode], "median": med, "min": min(times[mode]), "max": max(times[mode]),
            "x_sft": med / sft, "overhead": med - sft, "tokens": tokens, "tok_s": tokens / med,
            "peak_delta_mib": mib(delta), "peak_extra_mib": mib(delta - peaks["sft"][0]) if delta is not None
            and peaks["sft"][0] is not None else None, "peak_abs_mib": mib(absolute), "times": times[mode],
        })
    print(f"## Optimizer step ({tokens} tokens/step)\n")
    print(table(rows, [
        ("mode", "mode"), ("what", "what"), ("median", "s/step (median)"), ("min", "min"), ("max", "max"),
        ("x_sft", "x SFT"), ("overhead", "+s/step vs SFT"), ("tok_s", "tokens/s"),
        ("peak_delta_mib", "step peak MiB (above start)"), ("peak_extra_mib", "extra vs SFT MiB"),
        ("peak_abs_mib", "process peak MiB"),
    ]))
    print(f"\n  memory: {memory.label}")

    add_med, pen_med, prox_med = median(add_grad), median(penalty_fb), median(prox)
    overhead_rows = [
        {"what": "add_grad_() alone (once per optimizer step)", "seconds": add_med, "per_step": add_med,
         "pct": 100 * add_med / sft},
        {"what": "prox_step_() alone (decoupled; once per optimizer step)", "seconds": prox_med,
         "per_step": prox_med, "pct": 100 * prox_med / sft},
        {"what": f"penalty() fwd+bwd alone (per micro-batch; x{args.grad_accum} per step)", "seconds": pen_med,
         "per_step": pen_med * args.grad_accum, "pct": 100 * pen_med * args.grad_accum / sft},
        {"what": "SFT optimizer step (for scale)", "seconds": sft, "per_step": sft, "pct": 100.0},
    ]
    print(f"\n## Regularizer cost alone (median of {args.overhead_repeats})\n")
    print(table(overhead_rows, [("what", "component"), ("seconds", "seconds/call"),
                                ("per_step", "seconds/optimizer step"), ("pct", "% of SFT step")]))

    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    persistent = [
        {"what": "parameters", "mib": mib(param_bytes)},
        {"what": "gradients (allocated each step, inside the step peak)", "mib": mib(param_bytes)},
        {"what": "AdamW state", "mib": mib(state_bytes)},
        {"what": f"RPSFT bases (Uk, Vk, Sref; {len(bases)} matrices, k={args.k})", "mib": mib(bases.nbytes())},
    ]
    print("\n## Persistent memory\n")
    print(table(persistent, [("what", "what"), ("mib", "MiB")]))

    print("\n## Issue targets (measured here)\n")
    closed = next((r for r in rows if r["mode"] == "closed"), None)
    autograd = next((r for r in rows if r["mode"] == "autograd"), None)
    prox_row = next((r for r in rows if r["mode"] == "decoupled"), None)
    if closed:
        print(f"- RPSFT closed-form step time: {closed['x_sft']:.3f} x SFT at {tokens} tokens/step "
              f"(target <= 1.03 x at >= 32768 tokens/step on Qwen2.5-3B shapes)")
        if closed["peak_extra_mib"] is not None:
            print(f"- peak memory: RPSFT closed form = SFT + bases ({mib(bases.nbytes()):.1f} MiB) "
                  f"{closed['peak_extra_mib']:+.1f} MiB in-step (target: <= SFT + bases, i.e. <= +0)")
    if autograd:
        extra = (f", {autograd['peak_extra_mib']:+.1f} MiB in-step peak vs SFT"
                 if autograd["peak_extra_mib"] is not None else "")
        print(f"- RPSFT autograd reference: {autograd['x_sft']:.3f} x SFT{extra}")
    if prox_row:
        extra = (f", {prox_row['peak_extra_mib']:+.1f} MiB in-step peak vs SFT"
                 if prox_row["peak_extra_mib"] is not None else "")
        closed_x = f" (closed form {closed['x_sft']:.3f} x)" if closed else ""
        print(f"- RPSFT decoupled (prox step after AdamW): {prox_row['x_sft']:.3f} x SFT{closed_x}{extra}")

    end_load = environment(device).get("load_avg_1m")
    print(f"\n# load_avg_1m at start {env.get('load_avg_1m')}, at end {end_load} ({torch.get_num_threads()} "
          "threads; well above that = other processes share the CPU, timings inflated)")
    write_json(args.json, {
        "args": vars(args), "env": env, "source": source, "params": n_params, "tokens_per_step": tokens,
        "bases_bytes": bases.nbytes(), "bases_seconds": seconds_bases, "steps": rows,
        "add_grad_seconds": add_grad, "prox_step_seconds": prox, "penalty_fwd_bwd_seconds": penalty_fb, "persistent": persistent,
        "memory_method": memory.label, "env_end_load": end_load,
    })


if __name__ == "__main__":
    main()

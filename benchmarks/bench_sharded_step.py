#!/usr/bin/env python
"""Benchmark the sharded RPSFT penalty's overhead per optimizer step under FSDP2, against FSDP2 SFT.

``--workers`` ranks (gloo on CPU, NCCL with ``--device cuda``, one GPU per rank) train a random-init model of
a real architecture (``bench_common.arch_config``, cut to ``--layers`` blocks) with
:func:`rpsft.core.fsdp.shard_model` and :func:`rpsft.core.fsdp.train_steps`, once per method:

* ``sft``: no penalty;
* ``rpsft k=<k>``: :class:`rpsft.core.sharded_penalty.ShardedRPSFTPenalty` over every projection matrix,
  its slices read from one bases file (:func:`load_row_shard`);
* ``l2-init``: the same at full rank (``W - W0`` per shard, no communication for the gradient).

Per method: the median seconds of an optimizer step (after ``--warmup`` steps), the ratio to SFT's step in the
same run, and the median seconds inside ``add_grad_`` alone (its all-reduce included). Machines are noisy:
read the ratios, which are taken within one run.

    python benchmarks/bench_sharded_step.py                                 # CPU, 2 gloo ranks, SmolLM2 x 4 blocks
    python benchmarks/bench_sharded_step.py --device cuda --workers 8 --arch llama3-8b --layers 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import arch_config, environment, median, table, write_json  # noqa: E402
from rpsft.core.bases import compute_bases, save_bases  # noqa: E402
from rpsft.core.distributed import spawn_local  # noqa: E402
from rpsft.core.fsdp import adamw, parameter_names, shard_model, train_steps  # noqa: E402
from rpsft.core.row_shards import load_row_shard  # noqa: E402
from rpsft.core.selection import select_matrices  # noqa: E402
from rpsft.core.sharded_penalty import ShardedRPSFTPenalty  # noqa: E402


class TimedPenalty:
    """The penalty, with the wall time of each ``add_grad_`` recorded."""

    def __init__(self, penalty, device) -> None:
        self.penalty, self.device, self.seconds = penalty, device, []

    def add_grad_(self, step=None):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        value = self.penalty.add_grad_(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        return value


def build_model(args, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config(args.arch, layers=args.layers))
    return model.to(device=device, dtype=getattr(torch, args.dtype))


def batch(args, step):
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 1000, (args.batch * args.workers, args.length), generator=gen)
    labels = ids.clone()
    labels[:, : args.length // 4] = -100  # a prompt
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _rank(rank, world_size, args, bases_paths, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    rows = []
    for method, path in bases_paths.items():
        model = build_model(args, device)
        shard_model(model, init_device_mesh(device.type, (world_size,)), mixed_precision=args.mixed_precision)
        penalty = None
        if path is not None:
            shards = {n: s.to(device) for n, s in load_row_shard(path, world_size, rank).items()}
            named = parameter_names(model)
            penalty = TimedPenalty(
                ShardedRPSFTPenalty(shards, {n: named[n] for n in shards}, args.lam), device
            )
        optimizer = adamw(model, 1e-5, 0.0)
        seconds = []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            start = time.perf_counter()
            train_steps(model, [batch(args, step)], optimizer, penalty=penalty)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        rows.append(
            {
                "method": method,
                "step_s": median(seconds[args.warmup :]),
                "penalty_s": median(penalty.seconds[args.warmup :]) if penalty else 0.0,
            }
        )
        del model, optimizer
    if rank == 0:
        torch.save(rows, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="smollm2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mixed-precision", default=None, choices=["bf16"])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--lam", type=float, default=100.0)
    parser.add_argument("--batch", type=int, default=2, help="sequences per worker")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, torch.device("cpu"))
        selection = select_matrices(model, "all")
        paths: dict[str, str | None] = {"sft": None}
        for method, k in ((f"rpsft k={args.k}", args.k), ("l2-init", 1.0)):
            path = Path(tmp) / f"{method.replace(' ', '_')}.safetensors"
            save_bases(compute_bases(selection, k), path, k)
            paths[method] = str(path)
        del model, selection
        out = Path(tmp) / "rows.pt"
        spawn_local(
            _rank, args.workers, args, paths, str(out), backend="gloo" if args.device == "cpu" else "nccl"
        )
        rows = torch.load(out)
    sft = rows[0]["step_s"]
    for row in rows:
        row["ratio_to_sft"] = row["step_s"] / sft
        row["penalty_share"] = row["penalty_s"] / row["step_s"]
    env = environment(torch.device(args.device))
    print(
        f"# FSDP2 step, {args.workers} workers, {args.arch} x {args.layers} blocks, {args.dtype}, "
        f"batch {args.batch}/worker x {args.length} tokens; {env}"
    )
    print(
        table(
            rows,
            [
                ("method", "method"),
                ("step_s", "step s (median)"),
                ("ratio_to_sft", "ratio to SFT"),
                ("penalty_s", "add_grad_ s"),
                ("penalty_share", "share of step"),
            ],
        )
    )
    write_json(args.json, {"args": vars(args), "environment": env, "rows": rows})


if __name__ == "__main__":
    main()

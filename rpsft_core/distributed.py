"""The process group of a run over several workers: this rank's place and device, the few collectives the
training code needs, and local ranks started on this machine.

Every helper works without a process group too (one process is rank 0 of 1), so the same code trains in one
process. :func:`spawn_local` runs a function on N local processes joined by a process group (gloo on CPU): the
tests, the benchmark and ``rpsft train --workers N`` use it; sweeps start their workers through Ray Train
instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group`` (None: the default group); ``(0, 1)`` when no
    process group is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``values`` summed over the ranks of ``group`` in place (unchanged in one process); returns it."""
    import torch.distributed as dist

    if world(group)[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (a float64 tensor on ``device`` carries it; NCCL needs CUDA)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def from_rank0(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` run on rank 0 only, its (picklable) result broadcast to every rank; an error on rank 0 is
    raised on every rank instead of leaving the others waiting (``what`` names the work in that error)."""
    import torch.distributed as dist

    rank, world_size = world()
    if world_size == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as exc:  # re-raised below, after every rank has heard of it
            error = exc
            box = [("error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"{what}: failed on rank 0 ({value})")
    return value


def rank_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` (modulo the visible GPUs) when CUDA is available, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", world()[0]))
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_rank_main(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Callable, world_size: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes in one process group.

    ``fn`` must be importable (a module-level function). A failure on any rank raises here."""
    import torch.multiprocessing as mp

    mp.spawn(
        _local_rank_main, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=True
    )

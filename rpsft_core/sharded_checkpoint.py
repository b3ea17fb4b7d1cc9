"""Resumable checkpoints of a sharded run: ``torch.distributed.checkpoint`` under ``<output_dir>/dcp/step-<N>``.

A save holds the model, the optimizer, the scheduler and the progress (step, data position, loss sum, log
history); rank 0 writes a marker file once a save is complete and keeps only the latest. A rerun resumes from
the latest complete one (:func:`latest_complete_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from rpsft.core.distributed import barrier, world
from torch import nn

DCP_DIR = "dcp"
COMPLETE_MARKER = "complete.json"


def checkpoint_dir_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``<output_dir>/dcp/step-<N>`` whose save finished (its marker file exists), or None."""
    done = [
        path
        for path in (Path(output_dir) / DCP_DIR).glob("step-*")
        if path.name.removeprefix("step-").isdigit() and (path / COMPLETE_MARKER).is_file()
    ]
    return max(done, key=checkpoint_dir_step, default=None)


def resumed_batch_mismatch(checkpoint: str | os.PathLike, global_batch: int) -> str | None:
    """Why resuming ``checkpoint`` at ``global_batch`` examples per step changes the run, or None: the data
    position is counted in examples, so the same example order continues, cut into other steps."""
    marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    step, seen = int(marker["step"]), int(marker["examples_seen"])
    if step < 1 or seen == step * global_batch:
        return None
    return (
        f"resume: the checkpoint {checkpoint} took {seen // step} examples per optimizer step, this run takes "
        f"{global_batch} (batch_size x workers x grad_accum); steps after {step} see other groups of examples "
        "than the interrupted run would have. Fix: resume with the same batch_size x workers x grad_accum, "
        "or accept the different run"
    )


class TrainState:
    """Model, optimizer, scheduler and progress as one ``torch.distributed.checkpoint`` ``Stateful``: the
    model and optimizer through ``get_state_dict`` / ``set_state_dict`` (sharded FQNs without wrapper
    prefixes), the progress (step, data position, loss sum, log history) as JSON text."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.progress: dict[str, Any] = {
            "step": 0,
            "examples_seen": 0,
            "loss_sum": 0.0,
            "log_history": [],
            "drift_history": [],
        }

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "progress": json.dumps(self.progress),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = json.loads(state["progress"])


def save_checkpoint(state: TrainState, output_dir: str | os.PathLike, step: int) -> Path:
    """Save ``<output_dir>/dcp/step-<step>`` (collective), then rank 0 writes its marker and removes every
    other checkpoint directory; returns the directory."""
    import torch.distributed.checkpoint as dcp

    rank, world_size = world()
    root = Path(output_dir) / DCP_DIR
    target = root / f"step-{step}"
    if rank == 0 and target.exists():
        shutil.rmtree(target)  # a save of this step that did not finish
    barrier()
    dcp.save({"train": state}, checkpoint_id=str(target))
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "examples_seen": state.progress["examples_seen"]}
        (target / COMPLETE_MARKER).write_text(json.dumps(marker))
        for other in root.glob("step-*"):
            if other != target:
                shutil.rmtree(other, ignore_errors=True)
    barrier()
    return target


def load_checkpoint(state: TrainState, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load({"train": state}, checkpoint_id=str(path))

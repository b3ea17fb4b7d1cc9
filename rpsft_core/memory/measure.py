"""The peak tensor bytes of a callable, as torch's ``MemTracker`` measures them (the tests compare the
estimate of :mod:`rpsft.core.memory.estimate` with it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def measure_peak_bytes(
    fn: Callable[[], object],
    *external: nn.Module | torch.optim.Optimizer | torch.Tensor,
    device: torch.device | str | None = None,
) -> int:
    """Run ``fn()`` under torch's ``MemTracker`` and return the peak tensor bytes on ``device``.

    ``external`` are the modules, optimizers and tensors made before the call (the model, the optimizer with
    its states, the batch): they are registered with ``track_external`` so that the peak includes them;
    tensors made inside ``fn`` are tracked anyway. With ``device=None`` the peak of the device that peaked
    highest is returned (the only one, on a CPU or one-GPU run)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*external)
    with tracker:
        fn()
    peaks = {dev: snap.get("Total", 0) for dev, snap in tracker.get_tracker_snapshot("peak").items()}
    if device is not None:
        return int(peaks.get(torch.device(device), 0))
    return int(max(peaks.values(), default=0))

"""The order of a sharded run's examples: one deterministic stream over the epochs, cut into optimizer steps,
micro-batches and each rank's rows.

The examples follow a permutation per epoch, seeded by ``config.seed``; the epochs follow one another as one
stream, so every optimizer step sees ``batch_size * world_size * grad_accum`` examples and a resumed run finds
its position again. ``batch_size`` is per device, as with the HF Trainer; each rank takes its rows of each
micro-batch (:func:`rpsft.core.row_shards.row_range` order, as :func:`rpsft.core.fsdp.local_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from rpsft.core.row_shards import row_range


class ExampleStream:
    """Example indices as one stream over the epochs: epoch ``e`` is a permutation of ``range(n)`` seeded by
    ``(seed, e)``, so the order is fixed by the seed and any position can be found again (a resumed run)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            import numpy as np

            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._orders[epoch] = rng.permutation(self.n).tolist()
        return self._orders[epoch]

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return self.order(epoch)[offset]


def rank_step_batches(
    dataset: Any,
    stream: ExampleStream,
    *,
    start_position: int,
    steps: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    pad_token_id: int,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """This rank's micro-batches of each optimizer step: step ``s`` covers the stream positions
    ``[start + s G, start + (s + 1) G)`` with ``G = batch_size * world_size * grad_accum``; micro-batch ``j`` is
    ``batch_size * world_size`` of them, of which this rank collates its rows (:func:`row_range` order)."""
    from rpsft.core.data import collate_features

    micro = batch_size * world_size
    start, end = row_range(micro, world_size, rank)
    position = start_position
    for _ in range(steps):
        batches = []
        for j in range(grad_accum):
            first = position + j * micro
            features = [dataset[stream[first + r]] for r in range(start, end)]
            batches.append(collate_features(features, pad_token_id))
        position += micro * grad_accum
        yield batches

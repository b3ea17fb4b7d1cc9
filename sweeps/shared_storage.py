"""Storage that every node sees: on a Ray cluster of several nodes, each node must find the sweep's state and
inputs at the same paths as the driver, because a trial (or its retry after a node is lost) may run on any node.

:func:`check_every_node_sees` writes a probe file with a random token under ``output_dir`` and runs one task
pinned to each alive node (no CPU, no GPU) that reads it back, and checks that the local inputs (model, training
data, evaluation items) exist there. A node-local ``output_dir`` fails here, before any trial: on a cluster it
would lose a trial's checkpoints, the shared bases and Tune's experiment with its node.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig

PROBE_PREFIX = ".rpsft-storage-probe-"
NODE_ANSWER_TIMEOUT_S = 120.0


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster, as :func:`ray.nodes` describes them."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_inputs(config: SweepConfig) -> dict[str, str]:
    """The config fields that name a local path a trial reads (absolute, as :func:`rpsft.sweeps.runner.absolutize`
    leaves them), by field name: ``model``, ``data``, ``evaluation.data_dir``."""
    fields = {"model": config.model, "data": config.data, "evaluation.data_dir": config.evaluation.data_dir}
    return {field: value for field, value in fields.items() if value and Path(value).is_absolute()}


def _what_this_node_sees(probe: str, inputs: dict[str, str]) -> dict[str, Any]:
    """On one node: the probe file's text (``None`` if absent) and the input paths that are missing."""
    import socket

    path = Path(probe)
    text = path.read_text() if path.is_file() else None
    missing = [field for field, value in inputs.items() if not Path(value).exists()]
    return {"probe": text, "missing": missing, "host": socket.gethostname()}


def check_every_node_sees(config: SweepConfig, timeout_s: float = NODE_ANSWER_TIMEOUT_S) -> int:
    """On a cluster of several nodes, refuse (:class:`SweepConfigError`) an ``output_dir`` or a local input
    that some node does not see at the driver's path; returns the number of nodes checked (1: nothing to check).
    Needs a connected Ray session."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return 0
    nodes = alive_nodes()
    if len(nodes) < 2:
        return len(nodes)
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = root / f"{PROBE_PREFIX}{token}"
    probe.write_text(token)
    inputs = node_inputs(config)
    task = ray.remote(num_cpus=0)(_what_this_node_sees)
    try:
        refs = {
            node["NodeID"]: task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(probe), inputs)
            for node in nodes
        }
        try:
            answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        except ray.exceptions.GetTimeoutError:
            for ref in refs.values():
                ray.cancel(ref, force=True)
            raise SweepConfigError(
                f"storage.ray_address: not every node of the Ray cluster ran the storage check within "
                f"{timeout_s:g} s. Fix: check that all {len(nodes)} nodes are healthy (`ray status`)"
            ) from None
    finally:
        probe.unlink(missing_ok=True)
    by_id = {node["NodeID"]: node for node in nodes}
    for node_id, answer in answers.items():
        where = f"node {by_id[node_id].get('NodeManagerAddress', '?')} ({answer['host']}, id {node_id[:12]})"
        if answer["probe"] != token:
            raise SweepConfigError(
                f"output_dir: {root} is not the same directory on {where} of this {len(nodes)}-node Ray cluster "
                "(a file the driver wrote there is not visible). Trials, their retries and the driver share "
                "checkpoints, bases and Tune's experiment through it. Fix: output_dir on storage every node "
                "mounts at the same path (NFS, or a bucket mounted with a FUSE driver), or run on one node"
            )
        if answer["missing"]:
            field = answer["missing"][0]
            raise SweepConfigError(
                f"{field}: {inputs[field]} does not exist on {where} of this {len(nodes)}-node Ray cluster. "
                f"Fix: put it at the same path on every node (shared storage), or give {field} as a path that does"
            )
    return len(nodes)

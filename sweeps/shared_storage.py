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
from rpsft.sweeps.config.sweep import SweepConfig, input_path_slots

PROBE_PREFIX = ".rpsft-storage-probe-"
NODE_ANSWER_TIMEOUT_S = 120.0


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster, as :func:`ray.nodes` describes them."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_inputs(config: SweepConfig) -> dict[str, str]:
    """The config fields that name a local path a trial reads (:func:`input_path_slots`) and that exist on the
    driver, absolute as :func:`rpsft.sweeps.runner.absolutize` leaves them, by field name."""
    slots = input_path_slots(config.model_dump(mode="json", by_alias=True))
    return {
        field: container[key]
        for field, container, key in slots
        if isinstance(container[key], str)
        and Path(container[key]).is_absolute()
        and Path(container[key]).exists()
    }


def _what_this_node_sees(probe: str, inputs: dict[str, str]) -> dict[str, Any]:
    """On one node: the probe file's text (``None`` if absent), the input fields whose paths are missing or
    unreadable, and the host name."""
    import socket

    def readable(path: Path) -> bool:
        try:
            return path.exists()
        except OSError:  # e.g. no permission on a folder above it
            return False

    path = Path(probe)
    try:
        text = path.read_text() if path.is_file() else None
    except OSError as exc:
        text = f"unreadable: {exc}"
    missing = [field for field, value in inputs.items() if not readable(Path(value))]
    return {"probe": text, "missing": missing, "host": socket.gethostname()}


def check_every_node_sees(
    config: SweepConfig, storage_urls: tuple[str, str], timeout_s: float = NODE_ANSWER_TIMEOUT_S
) -> int:
    """On a cluster of several nodes, refuse (:class:`SweepConfigError`) an ``output_dir`` or a local input
    that some node does not see at the driver's path, and, when the nodes are on several hosts, a SQLite store
    (``storage_urls``: Optuna's and MLflow's), which trials on other hosts would write over a network filesystem.
    Returns the number of nodes checked (0 or 1: nothing to check). Needs a connected Ray session; nodes that join
    later are not checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return 0
    nodes = alive_nodes()
    if len(nodes) < 2:
        return len(nodes)
    root = Path(config.output_dir)
    token = uuid.uuid4().hex
    probe = root / f"{PROBE_PREFIX}{token}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    except OSError as exc:
        raise SweepConfigError(
            f"output_dir: cannot write to {root} ({exc}). Fix: a writable directory"
        ) from None
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
        except ray.exceptions.RayError as exc:  # a node died or drained meanwhile, a worker could not start
            raise SweepConfigError(
                f"storage.ray_address: the storage check could not run on every node of the Ray cluster "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). "
                "Fix: check that all nodes are healthy (`ray status`), then start the sweep again"
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
                "checkpoints, bases and Tune's experiment through it. Fix: output_dir on a shared filesystem "
                "every node mounts at the same path (NFS, CephFS, EFS, Filestore), or run on one node"
            )
        if answer["missing"]:
            field = answer["missing"][0]
            raise SweepConfigError(
                f"{field}: {inputs[field]} does not exist on {where} of this {len(nodes)}-node Ray cluster. "
                f"Fix: put it at the same path on every node (shared storage), or give {field} as a path that does"
            )
    hosts = {answer["host"] for answer in answers.values()}
    for field, url in zip(("storage.optuna", "storage.mlflow"), storage_urls, strict=True):
        if len(hosts) > 1 and url.startswith("sqlite:"):
            raise SweepConfigError(
                f"{field}: {url} is a SQLite file, and this Ray cluster's nodes are on {len(hosts)} hosts: trials "
                "on every host would write it over a network filesystem, where SQLite's locks are not safe. "
                "Fix: a postgresql:// URL"
                + (" or an http(s):// tracking server" if field == "storage.mlflow" else "")
            )
    return len(nodes)

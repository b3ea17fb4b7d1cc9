#!/bin/sh
# Entrypoint of the `rpsft` service: join the Ray cluster as a node without CPUs or GPUs, so the sweep driver
# can connect with `--address ray-head:6379` (a Ray driver needs a local raylet of its cluster) while every
# trial runs on ray-head / ray-worker. Then run the given command (default: the sweep).
set -eu
if [ -n "${RAY_JOIN_ADDRESS:-}" ]; then
    ray start --address "$RAY_JOIN_ADDRESS" --num-cpus 0 --num-gpus 0 --disable-usage-stats
fi
exec "$@"

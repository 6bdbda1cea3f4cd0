#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices, talking through a
# localhost coordinator: the multi-host code path without a cluster (used by the tests).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#       --config=experiments/debug.py:tiny --workdir=/tmp/mp --config.data.shards=2
#
# Every process gets the same arguments; process 0 logs and writes metrics. Exits non-zero if
# any process fails. MODULE picks the program (default bltjax.main), e.g. offline entropies:
#
#   MODULE=bltjax.preprocess NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#       --config=experiments/debug.py:tiny --workdir=/tmp/mp --out=/tmp/mp_pre \
#       --config.data.shards=2
set -euo pipefail
n=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-1}
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    python -m "${MODULE:-bltjax.main}" --coordinator_address="localhost:${port}" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status

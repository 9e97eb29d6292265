#!/usr/bin/env bash
# N processes on this machine joined into one JAX job over 127.0.0.1, each with
# its own fake CPU devices: the multi-host code path (process-local data
# shards, global batches, coordinated checkpoints) without a cluster.
#
#   launch/local_multiprocess.sh --config=configs/tiny_cpu.py --workdir=/tmp/mmgen/mp \
#       --mode=train --config.train.num_steps=20
#
# Environment (defaults): NUM_PROCESSES=2, DEVICES_PER_PROCESS=2, PORT=12355,
# PYTHON=python, LOG_DIR=$(mktemp -d). Process 0 prints to this terminal; the
# others write $LOG_DIR/process_<i>.log. The script exits with the first
# failing process's status and stops the rest.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t mmgen_mp.XXXXXX)}
mkdir -p "$LOG_DIR"

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM

run() {  # run <process id>
  MMGEN_COORDINATOR="127.0.0.1:$PORT" MMGEN_NUM_PROCESSES="$NUM_PROCESSES" \
  MMGEN_PROCESS_ID="$1" JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
  "$PYTHON" -m mmgen_jax.main "${ARGS[@]}"
}
ARGS=("$@")

for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ((i == 0)); then run "$i" & else run "$i" > "$LOG_DIR/process_$i.log" 2>&1 & fi
  pids+=($!)
done
echo "started $NUM_PROCESSES processes (pids ${pids[*]}); processes 1.. log to $LOG_DIR" >&2

# Wait for whichever ends first; a failure stops the others (they would wait
# for the failed one at the next collective forever).
status=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if wait -n; then continue; else code=$?; fi
  if ((status == 0)); then
    echo "a process exited with status $code; stopping the others (logs: $LOG_DIR)" >&2
    status=$code
    stop_all
  fi
done
exit "$status"

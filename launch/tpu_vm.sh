#!/usr/bin/env bash
# Runs mmgen_jax on every worker of a Cloud TPU VM slice (one process per host;
# with MMGEN_AUTO_DISTRIBUTED=1, set below, JAX finds the other hosts itself from
# the TPU metadata and joins them, which also enables its preemption notices).
#
#   TPU_NAME=mmgen-v5p-32 ZONE=us-east5-a launch/tpu_vm.sh setup
#   TPU_NAME=mmgen-v5p-32 ZONE=us-east5-a launch/tpu_vm.sh run \
#       --config=configs/imagenet256_xl2.py --workdir=gs://BUCKET/runs/xl2 --mode=train
#   TPU_NAME=mmgen-v5p-32 ZONE=us-east5-a launch/tpu_vm.sh stop
#
#   setup  copy this checkout to ~/$REPO_DIR on every worker, make a venv, install .[tpu]
#   run    start `python -m mmgen_jax.main ARGS` on every worker. With DETACH=1
#          (default) it runs under nohup and logs to ~/mmgen.log on each worker, so
#          a dropped ssh session does not stop training; DETACH=0 streams the output.
#   stop   end the run on every worker (SIGTERM: the run saves a checkpoint first)
#
# Environment: TPU_NAME, ZONE (required); PROJECT (optional, gcloud's default
# otherwise); REPO_DIR=mmgen_jax; DETACH=1. The workdir and the data_dir must
# be on storage every worker sees (a gs:// bucket).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REPO_DIR=${REPO_DIR:-mmgen_jax}
DETACH=${DETACH:-1}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all)

on_all_workers() {  # on_all_workers "<remote shell command>"
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$1"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    "${GCLOUD[@]}" scp --recurse "$root" "$TPU_NAME:~/$REPO_DIR" "${WHERE[@]}"
    on_all_workers "cd ~/$REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    args=$(printf '%q ' "$@")
    run="cd ~/$REPO_DIR && MMGEN_AUTO_DISTRIBUTED=1 .venv/bin/python -m mmgen_jax.main $args"
    if [[ "$DETACH" == 1 ]]; then
      on_all_workers "nohup bash -c $(printf '%q' "$run") > ~/mmgen.log 2>&1 < /dev/null & echo started on \$(hostname), log ~/mmgen.log"
    else
      on_all_workers "$run"
    fi
    ;;
  stop)
    # '[-]m' keeps the pattern from matching this remote shell's own command line.
    on_all_workers "pkill -TERM -f -- '[-]m mmgen_jax.main' || true"
    ;;
  *)
    echo "usage: $0 setup | run [mmgen_jax.main flags...] | stop" >&2
    exit 2
    ;;
esac

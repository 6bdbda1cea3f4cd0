#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a ACCELERATOR=v5p-256 \
#       launch/tpu_pod.sh create                       # once: create the slice
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a launch/tpu_pod.sh setup    # once: install bltjax
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a WORKDIR=gs://bucket/runs/8b \
#       launch/tpu_pod.sh run --config=experiments/8b.py --config.data.source=arrayrecord \
#       --config.data.paths="('gs://bucket/data/*.arrayrecord',)"
#
# Offline entropies on the same slice (every host runs the entropy model on its own chips and
# writes its own shards; re-running finishes the missing ones):
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a MODULE=bltjax.preprocess WORKDIR=gs://bucket/runs/8b \
#       launch/tpu_pod.sh run --config=experiments/8b.py --out=gs://bucket/data/8b_entropies \
#       --num_training_processes=64 ...
# (WORKDIR is optional there: the run whose stage-1 entropy model is used.)
#
# `run` starts the same command on all workers (--worker=all); JAX finds the other hosts itself
# (jax.distributed.initialize() on a TPU VM needs no arguments). Re-running `run` resumes from the
# latest checkpoint in WORKDIR. Check the memory first from any machine:
#   python -m bltjax.aot --config=experiments/8b.py --topology=v5p-256
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/your-org/bltjax.git}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
case "${1:-}" in
  create)
    : "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-256}"
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="${RUNTIME_VERSION:-v2-alpha-tpuv5}" ;;
  setup)
    ssh_all "git clone $REPO bltjax 2>/dev/null || git -C bltjax pull; cd bltjax && \
      python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu]'" ;;
  run)
    shift
    module=${MODULE:-bltjax.main}
    if [[ "$module" == bltjax.main ]]; then
      : "${WORKDIR:?set WORKDIR (a gs:// path shared by all workers)}"
    fi
    args=$(printf "%q " "$@")
    # ssh does not carry this shell's environment: the XLA flags set here (bltjax adds its
    # collective-overlap defaults to LIBTPU_INIT_ARGS for each one not set) go along.
    env_args=""
    for var in LIBTPU_INIT_ARGS XLA_FLAGS; do
      if [[ -n "${!var:-}" ]]; then env_args+="$var=$(printf "%q" "${!var}") "; fi
    done
    ssh_all "cd bltjax && . .venv/bin/activate && \
      $env_args python -m $module ${WORKDIR:+--workdir=$WORKDIR} $args 2>&1 | tee -a ~/bltjax.log" ;;
  *)
    echo "usage: $0 {create|setup|run [flags of \$MODULE, default bltjax.main]}" >&2; exit 2 ;;
esac

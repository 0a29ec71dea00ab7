#!/usr/bin/env bash
# Runs `python -m mammojax.main --distributed_auto ...` on every worker of a Cloud TPU VM pod
# slice at once (jax.distributed finds the other workers through the TPU metadata server).
#
# Usage:
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh [--setup] [--detach] -- \
#       --config=configs/imgfeatalign.py:paper --workdir=/mnt/shared/runs/ifa1 \
#       --config.data.dir=/mnt/shared/ingested
#
# Options (before the `--`):
#   --setup    first copy this checkout (tracked and untracked, not ignored, files) to REPO_DIR on
#              every worker and `pip install -e .` there with jax[tpu]. Needed once per pod,
#              and again after code changes.
#   --detach   start the job with nohup on every worker (log in REPO_DIR/mammojax-<worker>.log)
#              and return; without it the job runs in the ssh sessions and stops with them.
# Everything after `--` goes to mammojax.main. The workdir must be one directory every worker
# sees (see launch/README.md).
#
# Environment:
#   TPU, ZONE   the TPU VM name and zone (required)
#   PROJECT     the Google Cloud project (default: gcloud's configured project)
#   REPO_DIR    the checkout directory on the workers (default: mammojax, in the home directory)
#   PYTHON      the Python on the workers (default: python3)
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

REPO_DIR="${REPO_DIR:-mammojax}"
PYTHON="${PYTHON:-python3}"
setup=0
detach=0
while (($#)); do
  case "$1" in
    --setup) setup=1; shift ;;
    --detach) detach=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (mammojax.main arguments go after --)" >&2; usage 2 ;;
  esac
done
if (($# == 0)); then
  echo "give the mammojax.main arguments after --, e.g. -- --config=... --workdir=..." >&2
  exit 2
fi
: "${TPU:?set TPU to the TPU VM name (see --help)}"
: "${ZONE:?set ZONE to the TPU zone (see --help)}"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  where+=(--project="$PROJECT")
fi

on_all_workers() {  # Runs one shell command on every worker, in parallel.
  "${gcloud_tpu[@]}" ssh "$TPU" "${where[@]}" --worker=all --command="$1"
}

if ((setup)); then
  repo_root="$(cd "$(dirname "$0")/.." && pwd)"
  archive="$(mktemp -t mammojax-XXXXXX.tar.gz)"
  trap 'rm -f "$archive"' EXIT
  (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -czf "$archive" -T -)
  "${gcloud_tpu[@]}" scp "$archive" "$TPU:mammojax-src.tar.gz" "${where[@]}" --worker=all
  on_all_workers "set -e; mkdir -p $(printf '%q' "$REPO_DIR") && \
    tar -xzf mammojax-src.tar.gz -C $(printf '%q' "$REPO_DIR") && rm mammojax-src.tar.gz && \
    cd $(printf '%q' "$REPO_DIR") && $PYTHON -m pip install -q -U 'jax[tpu]' && \
    $PYTHON -m pip install -q -e ."
fi

main_args="$(printf '%q ' "$@")"
job="$PYTHON -m mammojax.main --distributed_auto $main_args"
if ((detach)); then
  # The worker number makes each log name unique when REPO_DIR is on a shared disk.
  metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  worker="\$(curl -s -H Metadata-Flavor:Google $metadata/agent-worker-number)"
  job="nohup $job > mammojax-$worker.log 2>&1 < /dev/null &"
fi
on_all_workers "cd $(printf '%q' "$REPO_DIR") && $job"

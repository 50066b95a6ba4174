#!/usr/bin/env bash
# The one GPU check: under 8 minutes on one H100/H200, nothing downloaded, real-size models with
# random weights built in code. Writes bench/results/gpu_<part>.json and gpu_check.{json,md}
# naming the device. Parts that need CUDA are skipped with a message when there is none.
#
#   bash bench/gpu_check.sh            # the real sizes (a GPU machine)
#   bash bench/gpu_check.sh --dry-run  # toy sizes, any machine: every step is known to run
#
# PY selects the interpreter (default .venv/bin/python); each part has its own time limit so one
# slow or failing part does not take the others with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DRY=()
[ "${1:-}" = "--dry-run" ] && DRY=(--dry-run)
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || echo "no NVIDIA GPU visible: GPU parts will be skipped"
"$PY" -m refface.cli doctor --no-verify || true
status=0
# part and its time limit in seconds (7.5 minutes together)
for spec in arcface:50 refldm:100 mgfr:100 pipeline:50 faiss:150; do
  part="${spec%%:*}"
  limit="${spec##*:}"
  [ ${#DRY[@]} -gt 0 ] && limit=600
  echo "== $part (limit ${limit}s)"
  if ! timeout "$limit" "$PY" bench/gpu_check.py --part "$part" "${DRY[@]}"; then
    echo "part $part failed or ran out of time" >&2
    status=1
  fi
done
"$PY" bench/gpu_check.py --part report "${DRY[@]}"
exit $status

#!/usr/bin/env bash
# select_runtime.sh PYTHON cpu|gpu
# Leave exactly one build of onnxruntime and of FAISS in the environment of PYTHON.
#
# onnxruntime / onnxruntime-gpu and faiss-cpu / faiss-gpu(-cu12) install the same module folder;
# with both present whichever was installed last wins, and uninstalling one deletes files of the
# other. So when the wrong build is present, every build is removed and the right one reinstalled.
set -euo pipefail
py="$1"
runtime="$2"
case "$runtime" in
  cpu) ort_want=onnxruntime; faiss_want=faiss-cpu ;;
  gpu) ort_want=onnxruntime-gpu; faiss_want=faiss-gpu ;;
  *) echo "usage: $0 PYTHON cpu|gpu" >&2; exit 2 ;;
esac

installed() {  # the distributions among "$@" that are installed, one per line
  "$py" - "$@" <<'PY'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    try:
        metadata.version(name)
        print(name)
    except metadata.PackageNotFoundError:
        pass
PY
}

version_of() {  # the installed version of $1 (empty when absent)
  "$py" -c "from importlib import metadata as m
try: print(m.version('$1'))
except m.PackageNotFoundError: pass"
}

fix() {  # fix WANT SPEC_EXTRAS NAME... : keep only WANT among NAME...
  local want="$1" extras="$2"
  shift 2
  local present others
  present="$(installed "$@")"
  others="$(grep -vx "$want" <<<"$present" || true)"
  if [ -z "$others" ] && grep -qx "$want" <<<"$present"; then
    echo "runtime: $want $(version_of "$want")"
    return
  fi
  local version
  version="$(version_of "$want")"
  if [ -n "$present" ]; then
    # shellcheck disable=SC2086
    "$py" -m pip uninstall -y -q $present
  fi
  "$py" -m pip install -q "$want$extras${version:+==$version}"
  echo "runtime: $want $(version_of "$want") (removed: ${others:-nothing})"
}

fix "$ort_want" "$([ "$runtime" = gpu ] && echo '[cuda,cudnn]')" onnxruntime onnxruntime-gpu
fix "$faiss_want" "" faiss-cpu faiss-gpu faiss-gpu-cu12 faiss-gpu-cu11

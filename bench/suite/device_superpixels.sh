#!/usr/bin/env bash
# The torch-superpixel GPU check in one device call (performance issue, item 1). Prepare here, once:
#     bash bench/fetch_device_wheels.sh          # -> .whl/ (git-ignored), as for bench/device_check.sh
# then run on the device machine with `.whl` carried and timeout_s=600:
#     bash bench/suite/device_superpixels.sh
# Stages, each under its own limit: the CUDA tests of tests/test_gpu_superpixels.py (Triton kernel against
# plain torch, CUDA against CPU, quality, determinism), then `bench/run.py --device cuda` for the
# superpixels and extrapolation entries (medium synthetic nuScenes is generated on the way, ~1 min).
# Results land in $OUT: log.txt and results-cuda.json (render it here with
# `.venv/bin/python bench/run.py --render-only bench/suite/results-cpu.json OUT/results-cuda.json`).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out/device}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  return $rc
}

stage env 60 $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name());
import triton; print('triton', triton.__version__)"
stage pytest-gpu 240 $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu_superpixels.py
stage bench 300 $PY bench/run.py --device cuda --only superpixels,extrapolation --out "$OUT/results-cuda.json"
echo "== done"
